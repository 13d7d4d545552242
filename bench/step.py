"""Train-step throughput and peak memory of the PSA-MF model alone (no data pipeline, no Ray).

    python bench/step.py --preset tiny --batch-size 16
    python bench/step.py --preset paper --batch-size 16 --steps 3
    python bench/step.py --preset paper --batch-size 16 --device cuda --amp bf16
    python bench/step.py --preset paper --batch-size 128 --device cuda --amp fp16 --only precomputed --out r.jsonl

Each run goes through the real `psamf.engine.train_step` and then times the bare-BERT limit (a plain HF BertModel
of the same geometry, forward + backward + Adam at the same padded length); it prints samples/s, step time and
model FLOPs utilisation (psamf.flops: the FLOP count used is in `flops_by_part`) side by side. `loop_step_s` /
`loop_samples_per_s` time the same batch through the training loop's `engine.train_epoch` instead (page-locked on a
GPU, gradient norms read once per epoch rather than every step): the figure a training run's steps approach.

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

from psamf import engine
from psamf.config import Config
from psamf.data import pin_batch
from psamf.flops import bare_bert_step_flops, mfu, peak_tflops, step_flops
from psamf.model import additive_mask, build_model, load_personality_encoder


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


class BareBert:
    """The bare-BERT limit: a plain HF BertModel with all of the sentiment BERT's layers and fused Adam (as psamf),
    whose `step(batch)` is one forward + backward + optimiser step at the batch's padded length and autocast."""

    def __init__(self, cfg, dev: torch.device, amp_dtype) -> None:
        from transformers import BertModel

        from psamf.model import bert_config

        torch.manual_seed(0)
        self.dev, self.amp_dtype = dev, amp_dtype
        self.bert = BertModel(bert_config(cfg.model, cfg.model.bert_layers, cfg.model.vocab_size),
                              add_pooling_layer=False).to(dev).train()
        self.opt = torch.optim.Adam(self.bert.parameters(), lr=1e-5, fused=True)  # as engine.build_optimizer
        self.scaler = engine.make_scaler(amp_dtype, dev)

    def step(self, batch: dict) -> None:
        ids, mask4 = batch["input_ids"].to(self.dev), additive_mask(batch["attention_mask"].to(self.dev), torch.float32)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self.bert(input_ids=ids, attention_mask=mask4).last_hidden_state[:, 0].float().pow(2).mean()
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()


def bare_bert_step_s(cfg, batch: dict, dev: torch.device, amp_dtype, steps: int, warmup: int) -> float:
    """The bare-BERT limit's step time at this batch's shapes, timed like the PSA-MF step."""
    bare = BareBert(cfg, dev, amp_dtype)
    return _timed(lambda: bare.step(batch), dev, steps, warmup)


def _timed(step, dev: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def run(preset: str, batch_size: int, steps: int, warmup: int, precomputed: bool, device: str, amp: str,
        text_len: int, t_a: int, t_v: int, *, compile_model: bool = False, bare: bool = True,
        peak: float | None = None) -> dict:
    """One configuration through the real `engine.train_step` (its autocast, float16 scaling, fused Adam,
    clipping), then the bare-BERT limit at the same shapes; step time, samples/s and MFU side by side."""
    cfg = Config.from_preset(preset).override([f"optim.batch_size={batch_size}", f"optim.amp='{amp}'",
                                               f"optim.compile={str(compile_model).lower()}"])
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(cfg.model, with_personality_encoder=not precomputed).to(dev).train()
    engine.maybe_compile(model, cfg.optim)
    opt = engine.build_optimizer(model, cfg.optim)
    amp_dtype = engine.resolve_amp(cfg.optim.amp, dev)
    scaler = engine.make_scaler(amp_dtype, dev)
    batch = synthetic_batch(cfg.model, batch_size, text_len, t_a, t_v, "cpu")
    if precomputed:
        enc = load_personality_encoder(cfg.model)
        with torch.no_grad():
            batch["personality_cls"] = enc(input_ids=batch["p_input_ids"],
                                           attention_mask=batch["p_attention_mask"]).last_hidden_state[:, 0]
        batch = {k: v for k, v in batch.items() if not k.startswith("p_")}
        del enc
    peak_mem = {}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_bytes()
    t_first = time.perf_counter()
    engine.train_step(model, batch, opt, cfg, device=dev, amp_dtype=amp_dtype, scaler=scaler)
    first_s = time.perf_counter() - t_first  # includes compilation when optim.compile
    step_s = _timed(lambda: engine.train_step(model, batch, opt, cfg, device=dev, amp_dtype=amp_dtype,
                                              scaler=scaler), dev, steps, max(0, warmup - 1))
    # The training loop's own path: `train_epoch` over the batch from page-locked host memory on a GPU (as
    # `iter_batches(pin_memory=True)` delivers it), one wait per step for the loss terms, the gradient norms read
    # once at the end; train_step above also reads each step's gradient norm.
    loop_batch = pin_batch(batch) if dev.type == "cuda" else batch
    loop_s = _timed(lambda: engine.train_epoch(model, [loop_batch] * steps, opt, cfg, device=dev, amp_dtype=amp_dtype,
                                               scaler=scaler), dev, 1, 0) / steps
    if dev.type == "cuda":
        peak_mem = {"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    else:
        peak_mem = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                    "rss_before_steps_gib": round(rss0 / 2**30, 3)}
    L = batch["input_ids"].shape[1]
    mean_frames = (batch["audio_lengths"].float().mean().item(), batch["visual_lengths"].float().mean().item())
    fl = step_flops(cfg.model, batch_size, L, round(mean_frames[0]), round(mean_frames[1]),
                    precomputed_personality=precomputed)
    peak_tf, peak_src = peak_tflops(dev, "off" if amp_dtype is None else str(amp_dtype).replace("torch.float16", "fp16")
                                    .replace("torch.bfloat16", "bf16"), peak)
    out = {
        "preset": preset, "batch_size": batch_size, "precomputed_personality_cls": precomputed,
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off", "compile": compile_model,
        "steps": steps, "padded_text_len": L, "first_step_s": round(first_s, 4),
        "step_s": round(step_s, 4), "samples_per_s": round(batch_size / step_s, 2),
        "loop_step_s": round(loop_s, 4), "loop_samples_per_s": round(batch_size / loop_s, 2),
        "step_tflop": round(fl["total"] / 1e12, 4), "flops_by_part": fl,
        "peak_tflops": round(peak_tf, 3), "peak_source": peak_src, "mfu": round(mfu(fl["total"], step_s, peak_tf), 4),
        **peak_mem, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if bare:
        del model, opt
        b_s = bare_bert_step_s(cfg, batch, dev, amp_dtype, steps, warmup)
        b_fl = bare_bert_step_flops(cfg.model, batch_size, L)
        out |= {"bare_bert_step_s": round(b_s, 4), "bare_bert_samples_per_s": round(batch_size / b_s, 2),
                "bare_bert_tflop": round(b_fl / 1e12, 4), "bare_bert_mfu": round(mfu(b_fl, b_s, peak_tf), 4),
                "step_over_bare_bert": round(step_s / b_s, 3)}
    return out


def side_by_side(r: dict) -> str:
    """One line: the PSA-MF step and the bare-BERT limit, samples/s, step time and MFU."""
    line = (f"{r['preset']} B={r['batch_size']} L={r['padded_text_len']} amp={r['amp']}: psamf {r['samples_per_s']} "
            f"samples/s, {r['step_s']} s/step, {r['step_tflop']} TFLOP/step, MFU {r['mfu']:.2%}; "
            f"in the epoch loop {r['loop_samples_per_s']} samples/s")
    if "bare_bert_step_s" in r:
        line += (f" | bare BERT {r['bare_bert_samples_per_s']} samples/s, {r['bare_bert_step_s']} s/step, "
                 f"MFU {r['bare_bert_mfu']:.2%} | step / bare = {r['step_over_bare_bert']}")
    return line + f"  (peak {r['peak_tflops']} TFLOP/s: {r['peak_source']})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="fp16: with loss scaling")
    ap.add_argument("--compile", action="store_true", help="optim.compile (first_step_s includes compiling)")
    ap.add_argument("--no-bare-bert", action="store_true", help="skip the bare-BERT limit")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak for MFU (default: H200/H100 989, A100 312 bf16; V100 125, T4 65 fp16; CPU measured)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--text-len", type=int, default=50)
    ap.add_argument("--audio-frames", type=int, default=375, help="MOSI audio max 375")
    ap.add_argument("--visual-frames", type=int, default=500, help="MOSI vision max 500")
    ap.add_argument("--only", choices=["both", "with-bert", "precomputed"], default="both")
    ap.add_argument("--out", default=None, help="append each result as a JSON line to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only == "both":  # one process per mode: the CPU peak-RSS figure is per process
        print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__}))
        for mode in ("with-bert", "precomputed"):
            argv = [a for a in sys.argv[1:] if not a.startswith("--only")] + ["--only", mode]
            subprocess.run([sys.executable, __file__, *argv], check=True)
        return
    r = run(args.preset, args.batch_size, args.steps, args.warmup, args.only == "precomputed", args.device,
            args.amp, args.text_len, args.audio_frames, args.visual_frames, compile_model=args.compile,
            bare=not args.no_bare_bert, peak=args.peak_tflops)
    print(json.dumps(r), flush=True)
    print(side_by_side(r), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
