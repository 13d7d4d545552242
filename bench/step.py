"""Train-step throughput and peak memory of the PSA-MF model alone (no data pipeline, no Ray).

    python bench/step.py --preset tiny --batch-size 16
    python bench/step.py --preset paper --batch-size 16 --steps 3
    python bench/step.py --preset paper --batch-size 16 --device cuda --amp bf16

Runs each configuration twice: with the frozen personality BERT in the step (CLS_p computed every
step) and with a precomputed CLS_p (the shards' `personality_cls` column). Inputs are MOSI-shaped:
50 text tokens, audio (T_a, 5) and visual (T_v, 20) with true lengths drawn like the real data.
Peak memory: on CUDA, torch.cuda.max_memory_allocated; on CPU, the growth of the process's peak
resident set (ru_maxrss) over the resident set before the first step. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from psamf.config import Config
from psamf.losses import compute_losses
from psamf.model import build_model, load_personality_encoder, model_inputs, param_groups


def synthetic_batch(cfg, B: int, L: int, T_a: int, T_v: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text_len = torch.randint(L // 3, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < text_len[:, None]).long()
    ids = torch.randint(1000 % cfg.vocab_size, cfg.vocab_size, (B, L), generator=g) * mask
    ids[:, 0] = 101 % cfg.vocab_size
    a_len = torch.randint(T_a // 4, T_a + 1, (B,), generator=g)
    v_len = torch.randint(T_v // 4, T_v + 1, (B,), generator=g)
    batch = {
        "input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
        "p_input_ids": ids.clone(), "p_attention_mask": mask.clone(), "p_token_type_ids": torch.zeros_like(ids),
        "audio": torch.randn(B, T_a, cfg.audio_dim, generator=g) * (torch.arange(T_a)[None, :, None] < a_len[:, None, None]),
        "audio_lengths": a_len,
        "visual": torch.randn(B, T_v, cfg.visual_dim, generator=g) * (torch.arange(T_v)[None, :, None] < v_len[:, None, None]),
        "visual_lengths": v_len,
        "label": torch.empty(B).uniform_(-3, 3, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(preset: str, batch_size: int, steps: int, warmup: int, precomputed: bool, device: str, amp: str,
        text_len: int, t_a: int, t_v: int) -> dict:
    cfg = Config.from_preset(preset)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(cfg.model, with_personality_encoder=not precomputed).to(dev).train()
    opt = torch.optim.Adam(param_groups(model, cfg.optim))
    batch = synthetic_batch(cfg.model, batch_size, text_len, t_a, t_v, dev)
    inputs = model_inputs(batch)
    if precomputed:
        enc = load_personality_encoder(cfg.model).to(dev)
        with torch.no_grad():
            cls_p = enc(input_ids=batch["p_input_ids"], attention_mask=batch["p_attention_mask"]).last_hidden_state[:, 0]
        inputs = {k: v for k, v in inputs.items() if not k.startswith("p_")} | {"personality_cls": cls_p}
        del enc
    use_bf16 = amp == "bf16" and dev.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(**inputs)
            loss = compute_losses(out, batch["label"], cfg.loss, cfg.model)["total"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        mem = {"peak_gpu_mem_gib": round(peak / 2**30, 3)}
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mem = {"peak_rss_gib": round(peak / 2**30, 3), "rss_before_steps_gib": round(rss0 / 2**30, 3)}
    return {
        "preset": preset, "batch_size": batch_size, "precomputed_personality_cls": precomputed,
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "amp": "bf16" if use_bf16 else "off", "steps": steps,
        "step_s": round(dt / steps, 4), "samples_per_s": round(steps * batch_size / dt, 2), **mem,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["off", "bf16"], default="off")
    ap.add_argument("--text-len", type=int, default=50)
    ap.add_argument("--audio-frames", type=int, default=375, help="MOSI audio max 375")
    ap.add_argument("--visual-frames", type=int, default=500, help="MOSI vision max 500")
    ap.add_argument("--only", choices=["both", "with-bert", "precomputed"], default="both")
    args = ap.parse_args()
    if args.only == "both":  # one process per mode: the CPU peak-RSS figure is per process
        print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__}))
        for mode in ("with-bert", "precomputed"):
            argv = [a for a in sys.argv[1:] if not a.startswith("--only")] + ["--only", mode]
            subprocess.run([sys.executable, __file__, *argv], check=True)
        return
    print(json.dumps(run(args.preset, args.batch_size, args.steps, args.warmup, args.only == "precomputed",
                         args.device, args.amp, args.text_len, args.audio_frames, args.visual_frames)), flush=True)


if __name__ == "__main__":
    main()
