"""Small builders shared by the tests (no Ray, except `ctrl_c_when`, which joins the session's Ray)."""

from __future__ import annotations

import torch

from psamf.config import Config, ModelConfig


def tiny_cfg(**model_overrides) -> Config:
    cfg = Config.from_preset("tiny")
    if model_overrides:
        cfg = cfg.override([f"model.{k}={'null' if v is None else v}" for k, v in model_overrides.items()])
    return cfg


def fake_manifest(**kw) -> dict:
    """A shard manifest's fields that preflight reads (tiny widths, the packaged vocabulary), `kw` replacing."""
    m = {"dataset": "mosi", "feature_dims": {"audio": 7, "visual": 9},
         "counts": {"train": 200, "valid": 30, "test": 40},
         "tokenizers": {"text": {"name": "psamf:tiny", "vocab_size": 333, "max_len": 32},
                        "personality": {"name": "psamf:tiny", "vocab_size": 333, "max_len": 32}},
         "personality_cls": None}
    m.update(kw)
    return m


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


def has_complete_checkpoint(root, pattern: str = "checkpoint_epoch=*") -> bool:
    """Whether a checkpoint directory matching `pattern` under `root` holds every file its meta.json records, whole:
    what a run stopped now resumes from. A meta.json alone is not enough: Ray uploads a checkpoint's files one by
    one, maybe meta.json first, and a run stopped half way through the upload resumes from an older checkpoint."""
    import pyarrow.fs as pafs

    from psamf.checkpoint import verify_checkpoint

    return any(not verify_checkpoint(pafs.LocalFileSystem(), str(d)) for d in root.glob(pattern) if d.is_dir())


def ctrl_c_when(args: list, log_path, ready, *, cwd=None, timeout: float = 180) -> tuple[int, str]:
    """Run `python -m psamf.cli ARGS` in its own process group, joined to the test session's Ray, until `ready()`
    is true; then send SIGINT to the group (what Ctrl+C sends) and wait for it to exit. Returns (exit status, the
    output). The child is killed if it outlives the test's patience."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import ray

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "psamf.cli", *map(str, args)], env=env, cwd=cwd,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while not ready():
                assert proc.poll() is None, Path(log_path).read_text()[-3000:]
                assert time.time() < deadline, f"not ready within {timeout} s: {Path(log_path).read_text()[-2000:]}"
                time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return rc, Path(log_path).read_text()
