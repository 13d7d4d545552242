"""FLOP counts of a PSA-MF training step and model FLOPs utilisation (MFU), for the benchmarks.

Counted as multiply-adds x 2, matrix work only (elementwise ops, norms, softmax and the optimiser are left out, as
MFU figures usually do):

    BERT layer, per sequence of S tokens:  2 x (4 H^2 + 2 H I) x S      (Q, K, V, O projections and the FFN)
                                         + 4 x S^2 x H                  (Q K^T and attention x V, all heads)
    LSTM, per valid frame:                 2 x 4 x (D_in + h) x h       (the four gates)
    cross-modal attention, per sample:     2 x 2 x T x h x A (K, V projections of T frames) + 4 x T x A
    the rest (a/v tokens, projections, CLIP heads, fusion, head): 2 x its weights, once per sample

A training step is forward + backward = 3x the forward for everything that gets gradients; the frozen
personality BERT runs forward only (nothing when CLS_p is precomputed). The embedding lookup is not counted.
`bare_bert_step_flops` is the same count for a plain BERT of the sentiment BERT's geometry at the same padded length
(the benchmarks' "bare-BERT limit").
"""

from __future__ import annotations

import re
import time

import torch

from psamf.config import ModelConfig

# dense peak TFLOP/s per accelerator and autocast dtype (vendor figures, no sparsity)
PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H200", "fp16"): 989.0, ("H100", "bf16"): 989.0, ("H100", "fp16"): 989.0,
    ("A100", "bf16"): 312.0, ("A100", "fp16"): 312.0, ("V100", "fp16"): 125.0, ("T4", "fp16"): 65.0,
}


def bert_layer_flops(H: int, I: int, S: int) -> int:
    """Forward FLOPs of one BERT layer over one sequence of S tokens."""
    return 2 * (4 * H * H + 2 * H * I) * S + 4 * S * S * H


def lstm_flops(d_in: int, hidden: int, frames: int) -> int:
    """Forward FLOPs of a one-layer LSTM over `frames` valid frames (packed: padding costs nothing)."""
    return 2 * 4 * (d_in + hidden) * hidden * frames


def step_flops(cfg: ModelConfig, batch_size: int, text_len: int, audio_frames: int, visual_frames: int, *,
               precomputed_personality: bool = True, personality_len: int | None = None) -> dict[str, int]:
    """FLOPs of one training step (forward + backward) by part, plus `total`. `text_len` is the padded token
    width; `audio_frames` / `visual_frames` the frames of the batch (the sum of the true lengths for the LSTMs is
    `batch_size x` these when they are means; pass the padded maxima for an upper bound)."""
    B, H, I, A, h = batch_size, cfg.hidden_size, cfg.intermediate_size, cfg.av_dim, cfg.lstm_hidden
    fwd: dict[str, int] = {}
    fwd["bert_text"] = B * cfg.text_layers * bert_layer_flops(H, I, text_len)
    mm_len = text_len + 2 if cfg.prefusion_input == "sequence" else 3
    fwd["bert_multimodal"] = B * cfg.multimodal_layers * bert_layer_flops(H, I, mm_len if cfg.use_prefusion
                                                                          else text_len)
    fwd["lstm"] = B * (lstm_flops(cfg.audio_dim, h, audio_frames) + lstm_flops(cfg.visual_dim, h, visual_frames))
    # the unmasked reference attention reads cross_pad_to frames when that is longer
    pad = cfg.cross_pad_to if not cfg.cross_key_padding_mask and cfg.cross_pad_to else 0
    fwd["cross_attention"] = B * sum(4 * max(T, pad) * h * A + 4 * max(T, pad) * A
                                     for T in (audio_frames, visual_frames))
    rest = _rest_params(cfg)
    fwd["rest"] = 2 * B * rest
    out = {k: 3 * v for k, v in fwd.items()}
    if cfg.use_personality and not precomputed_personality:
        out["personality_forward"] = B * cfg.personality_layers * bert_layer_flops(H, I, personality_len or text_len)
    out["total"] = sum(out.values())
    return out


def _rest_params(cfg: ModelConfig) -> int:
    """Weights of the small dense layers outside the BERTs and LSTMs, each used once per sample."""
    H, A, P, C = cfg.hidden_size, cfg.av_dim, cfg.align_dim, cfg.clip_dim
    n = 2 * cfg.lstm_hidden * A  # the LSTMs' utterance linears
    if cfg.use_prefusion:
        n += 2 * A * H + (2 * 2 * H * C if cfg.use_clm_loss else 0)
    if cfg.use_personality:
        n += 2 * H * P + 2 * P * C
    n += 2 * H * A  # M_s queries
    n += 2 * 2 * A * A  # attention out-projections (and the query projection)
    if cfg.cross_block == "transformer":
        n += 2 * 2 * A * cfg.cross_ffn_dim
    if cfg.use_enhanced_fusion:
        serial = 2 * cfg.serial_dim + A
        n += 2 * A * cfg.serial_dim + serial * cfg.fusion_dim
        head_in = (A - cfg.conv_kernel + 1) + cfg.fusion_dim
    else:
        head_in = 3 * A
    n += head_in * cfg.head_hidden + cfg.head_hidden ** 2 + cfg.head_hidden
    return n


def bare_bert_step_flops(cfg: ModelConfig, batch_size: int, text_len: int) -> int:
    """Forward + backward FLOPs of a plain BERT with all of the sentiment BERT's layers at `text_len` tokens."""
    return 3 * batch_size * cfg.bert_layers * bert_layer_flops(cfg.hidden_size, cfg.intermediate_size, text_len)


def peak_tflops(device: torch.device | str, amp: str, override: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s, where the figure comes from): `override` if given; on a GPU the table entry for its name and
    the autocast dtype (float32 without autocast: a tenth of the bf16 figure is not assumed, the table's figure
    is used and said so); on a CPU a measured float32 matmul rate."""
    if override is not None:
        return override, "--peak-tflops"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (gpu, dtype), tf in PEAK_TFLOPS.items():
            if re.search(rf"\b{gpu}\b", name) and dtype == (amp if amp in ("bf16", "fp16") else "bf16"):
                return tf, f"{gpu} {dtype} dense peak (table)"
        raise ValueError(f"no peak figure for {name!r} / {amp}: pass --peak-tflops")
    return measured_matmul_tflops(), "measured: float32 matmul 2048^3 on this CPU"


def measured_matmul_tflops(n: int = 2048, reps: int = 3) -> float:
    """The CPU's sustained float32 matmul rate in TFLOP/s (best of `reps`, after one warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def mfu(flops_per_step: float, step_s: float, peak_tflops_value: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak."""
    return flops_per_step / step_s / (peak_tflops_value * 1e12)
