"""Small builders shared by the unit tests (no Ray)."""

from __future__ import annotations

import torch

from psamf.config import Config, ModelConfig


def tiny_cfg(**model_overrides) -> Config:
    cfg = Config.from_preset("tiny")
    if model_overrides:
        cfg = cfg.override([f"model.{k}={'null' if v is None else v}" for k, v in model_overrides.items()])
    return cfg


def make_batch(cfg: ModelConfig, B: int = 4, L: int = 12, T_a: int = 9, T_v: int = 11, seed: int = 0) -> dict:
    """A random batch with varied true lengths, valid frames first, zero padding after."""
    g = torch.Generator().manual_seed(seed)
    text_len = torch.randint(4, L + 1, (B,), generator=g)
    text_len[0] = L
    mask = (torch.arange(L)[None, :] < text_len[:, None]).long()
    ids = torch.randint(5, cfg.vocab_size, (B, L), generator=g) * mask
    ids[:, 0] = 2  # [CLS]
    ids[torch.arange(B), text_len - 1] = 3  # [SEP]
    a_len = torch.randint(1, T_a + 1, (B,), generator=g)
    a_len[0] = T_a
    v_len = torch.randint(1, T_v + 1, (B,), generator=g)
    v_len[0] = T_v
    audio = torch.randn(B, T_a, cfg.audio_dim, generator=g) * (torch.arange(T_a)[None, :, None] < a_len[:, None, None])
    visual = torch.randn(B, T_v, cfg.visual_dim, generator=g) * (torch.arange(T_v)[None, :, None] < v_len[:, None, None])
    return {
        "input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
        "p_input_ids": ids.clone(), "p_attention_mask": mask.clone(), "p_token_type_ids": torch.zeros_like(ids),
        "audio": audio, "audio_lengths": a_len, "visual": visual, "visual_lengths": v_len,
        "label": torch.empty(B).uniform_(-3, 3, generator=g),
    }
