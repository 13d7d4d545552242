"""Training throughput benchmark (a script, not a timed test).

CPU, Ray Train (default): samples/s per worker and the fraction of step time spent waiting for data, for the
`tiny` and `paper` presets (random init, no downloads), 1 vs 2 DDP workers, on synthetic MOSI-shaped shards
prepared into a temporary directory. The workers split the machine's CPUs (1 worker x 2 CPUs / 2 x 1 CPU, torch
threads set to match) inside an embedded local Ray with 4 logical CPUs, as the tests and `psamf train` use:

    OMP_NUM_THREADS=1 .venv/bin/python bench/train.py                       # tiny + paper, 1 and 2 workers
    OMP_NUM_THREADS=1 .venv/bin/python bench/train.py --presets tiny --workers 1,2 --steps 30

Each worker runs the real `psamf.engine.train_step` on batches from the real pipeline (`psamf.data.iter_batches`
over its `get_dataset_shard("train")`, splits loaded as in `psamf.data.load_datasets`); the first `--warmup`
steps are not timed. "data wait" is the time a worker spends in `next(batches)`, over the time of the timed steps.

GPU, one process, no Ray: samples/s and peak GPU memory of `train_step` with bf16 autocast on synthetic batches of
MOSI's shapes (50 tokens, audio up to 375 x 5, visual up to 500 x 20), data already in memory:

    python bench/train.py --device cuda --amp bf16 --presets paper --batch-size 32 --steps 20

Prints one line per configuration and a Markdown table; `--out FILE.json` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # bench/step.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

from psamf import data, engine, runtime  # noqa: E402
from psamf import flops as flops_mod  # noqa: E402
from psamf.config import Config  # noqa: E402
from psamf.model import build_model  # noqa: E402
from psamf.preflight import preflight  # noqa: E402
from psamf.train import worker_device  # noqa: E402
from step import bare_bert_step_s  # noqa: E402  (bench/step.py)

MOSI_SHAPES = {"L": 50, "T_a": 375, "T_v": 500}


# ----------------------------------------------------------------------------------------------------------------
# Ray Train path (CPU)
# ----------------------------------------------------------------------------------------------------------------


def bench_fn_per_worker(config: dict) -> list[dict] | None:
    """Time `warmup + steps` training steps on this worker's train shard, then drain the epoch untimed."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config["threads"])))
    cfg = Config.from_dict(config["config"], source="bench")
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = worker_device()
    amp_dtype = engine.resolve_amp(cfg.optim.amp, device)
    engine.seed_everything(cfg.optim.seed)
    model = ray.train.torch.prepare_model(build_model(cfg.model))
    opt = engine.build_optimizer(model, cfg.optim)
    shard = ray.train.get_dataset_shard("train")
    need = config["warmup"] + config["steps"]
    wait = comp = 0.0
    n = timed = flops = bare_flops = 0
    first_batch_s = None
    t_start = time.perf_counter()
    step = 0
    for batch, waited in engine.timed_batches(data.iter_batches(shard, cfg.data, cfg.optim.batch_size, epoch=0, train=True)):
        t1 = time.perf_counter()
        if first_batch_s is None:
            first_batch_s = t1 - t_start  # the epoch's pipeline start-up, paid once per epoch
        if step >= need:  # drain: every rank must finish the split's epoch
            continue
        engine.train_step(model, batch, opt, cfg, device=device, amp_dtype=amp_dtype)
        t2 = time.perf_counter()
        if step >= config["warmup"]:
            wait += waited
            comp += t2 - t1
            n += int(batch["label"].shape[0])
            timed += 1
            fl, bare = batch_flops(cfg, batch)
            flops += fl
            bare_flops += bare
        step += 1
    stats = engine.all_gather({"rank": rank, "steps": timed, "samples": n, "wait_s": wait, "compute_s": comp,
                          "first_batch_s": first_batch_s, "flops": flops, "bare_bert_flops": bare_flops})
    return stats if rank == 0 else None


def batch_flops(cfg: Config, batch: dict) -> tuple[int, int]:
    """(PSA-MF step FLOPs, bare-BERT step FLOPs) of one batch at its padded token width and mean true frame
    counts (psamf.flops)."""
    B, L = int(batch["input_ids"].shape[0]), int(batch["input_ids"].shape[1])
    a, v = (int(batch[k].float().mean().item()) for k in ("audio_lengths", "visual_lengths"))
    pre = "personality_cls" in batch
    return (flops_mod.step_flops(cfg.model, B, L, a, v, precomputed_personality=pre)["total"],
            flops_mod.bare_bert_step_flops(cfg.model, B, L))


def prepare_data(workdir: str, rows_needed: int, max_text_len: int) -> tuple[str, dict]:
    from psamf.prepare import prepare
    from psamf.synth import synthesize

    scale = max(0.1, rows_needed / 1284 * 1.1)  # MOSI train has 1284 utterances
    paths = synthesize("mosi", "mmsa", os.path.join(workdir, "synth"), seed=0, scale=scale)
    out = os.path.join(workdir, "shards")
    man = prepare({"format": "mmsa", "input": str(paths["pickle"]), "dataset": "mosi"}, out,
                  tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny", max_text_len=max_text_len)
    return out, man


def bench_config(preset: str, shards: str, workers: int, batch_size: int, storage: str,
                 stream: bool = False) -> Config:
    cpus = 2.0 / workers  # the 2 cores, shared between the workers; Ray Data keeps the other logical CPUs
    return Config.from_preset(preset).override([f"data.materialize={str(not stream).lower()}",
        f"data.uri={shards}", "data.tokenizer=psamf:tiny", "data.personality_tokenizer=psamf:tiny",
        "data.max_text_len=50", "data.dataset=mosi", f"optim.batch_size={batch_size}", "optim.amp='off'",
        f"run.num_workers={workers}", f"run.cpus_per_worker={cpus}", "run.use_gpu=false",
        f"run.storage_path={storage}", f"run.name=bench-{uuid.uuid4().hex[:8]}",
    ])


def run_ray(preset: str, workers: int, batch_size: int, steps: int, warmup: int, shards: str, manifest: dict,
            storage: str, threads: int | None = None, stream: bool = False) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = bench_config(preset, shards, workers, batch_size, storage, stream)
    pf = preflight(cfg, manifest=manifest)
    cfg = pf.cfg
    datasets = data.load_datasets(cfg.data, manifest, ("train",))
    trainer = TorchTrainer(
        bench_fn_per_worker,
        train_loop_config={"config": cfg.to_dict(), "steps": steps, "warmup": warmup,
                           "threads": threads or cfg.run.cpus_per_worker},
        datasets=datasets, dataset_config=data.split_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False,
                                               resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=cfg.run.name, storage_path=pf.storage.storage_path),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise result.error
    stats = result.return_value
    per_worker = [s["samples"] / (s["wait_s"] + s["compute_s"]) for s in stats if s["steps"]]
    wait_frac = sum(s["wait_s"] for s in stats) / sum(s["wait_s"] + s["compute_s"] for s in stats)
    step_s = float(np.mean([(s["wait_s"] + s["compute_s"]) / s["steps"] for s in stats if s["steps"]]))
    return {"mode": "ray-cpu" + (" streamed" if stream else ""), "preset": preset, "workers": workers,
            "batch_size": batch_size,
            "threads_per_worker": int(threads or cfg.run.cpus_per_worker),
            "timed_steps_per_worker": min(s["steps"] for s in stats),
            "samples_per_s_per_worker": float(np.mean(per_worker)),
            "samples_per_s_total": float(np.sum(per_worker)), "step_s": step_s,
            "data_wait_frac": float(wait_frac),
            # per worker: the step's FLOPs over its compute time (data wait excluded), and the bare-BERT FLOPs of
            # the same batches (the limit: a plain BERT at the same padded lengths)
            "tflop_per_step": sum(s["flops"] for s in stats) / sum(s["steps"] for s in stats) / 1e12,
            "achieved_tflops_per_worker": float(np.mean([s["flops"] / s["compute_s"] / 1e12 for s in stats
                                                        if s["steps"]])),
            "bare_bert_tflop_per_step": sum(s["bare_bert_flops"] for s in stats) / sum(s["steps"] for s in stats) / 1e12,
            "first_batch_s": float(np.mean([s["first_batch_s"] for s in stats if s["first_batch_s"] is not None])),
            "fit_wall_s": wall}


# ----------------------------------------------------------------------------------------------------------------
# In-process path (GPU, or CPU compute only)
# ----------------------------------------------------------------------------------------------------------------


def synthetic_batch(cfg: Config, B: int, seed: int) -> dict:
    """A padded batch of MOSI's shapes: lengths drawn in [max/4, max], the first row at the maximum."""
    g = torch.Generator().manual_seed(seed)
    L, Ta, Tv = MOSI_SHAPES["L"], MOSI_SHAPES["T_a"], MOSI_SHAPES["T_v"]

    def lengths(T_max: int, lo: int) -> torch.Tensor:
        x = torch.randint(lo, T_max + 1, (B,), generator=g)
        x[0] = T_max
        return x

    tl, al, vl = lengths(L, 8), lengths(Ta, Ta // 4), lengths(Tv, Tv // 4)
    mask = (torch.arange(L)[None] < tl[:, None]).long()
    ids = torch.randint(5, min(cfg.model.vocab_size, cfg.model.personality_vocab_size), (B, L), generator=g) * mask
    ids[:, 0] = 101 % cfg.model.vocab_size
    a = torch.randn(B, Ta, cfg.model.audio_dim, generator=g) * (torch.arange(Ta)[None, :, None] < al[:, None, None])
    v = torch.randn(B, Tv, cfg.model.visual_dim, generator=g) * (torch.arange(Tv)[None, :, None] < vl[:, None, None])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "p_input_ids": ids.clone(), "p_attention_mask": mask.clone(), "p_token_type_ids": torch.zeros_like(ids),
            "audio": a, "audio_lengths": al, "visual": v, "visual_lengths": vl,
            "label": torch.empty(B).uniform_(-3, 3, generator=g)}


def run_inproc(preset: str, device: str, amp: str, batch_size: int, steps: int, warmup: int,
               bare: bool = True) -> dict:
    dev = torch.device(device)
    cfg = Config.from_preset(preset).override([f"optim.batch_size={batch_size}", f"optim.amp='{amp}'"])
    engine.seed_everything(0)
    model = build_model(cfg.model).to(dev)
    opt = engine.build_optimizer(model, cfg.optim)
    amp_dtype = engine.resolve_amp(cfg.optim.amp, dev)
    scaler = engine.make_scaler(amp_dtype, dev)
    batches = [synthetic_batch(cfg, batch_size, s) for s in range(4)]
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        engine.train_step(model, batches[i % len(batches)], opt, cfg, device=dev, amp_dtype=amp_dtype, scaler=scaler)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"mode": f"inproc-{dev.type}", "preset": preset, "workers": 1, "batch_size": batch_size,
           "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off", "timed_steps_per_worker": steps,
           "samples_per_s_per_worker": batch_size * steps / sum(times), "step_s": float(np.mean(times)),
           "step_s_p90": float(np.percentile(times, 90)), "data_wait_frac": 0.0,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "trainable_params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}
    if dev.type == "cuda":
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name(dev)
    fl = [batch_flops(cfg, b) for b in batches]
    out["tflop_per_step"] = float(np.mean([f for f, _ in fl])) / 1e12
    out["achieved_tflops_per_worker"] = out["tflop_per_step"] / out["step_s"]
    if bare:  # the bare-BERT limit at the first batch's padded length (all four are padded to L = 50)
        del model, opt
        b_s = bare_bert_step_s(cfg, batches[0], dev, amp_dtype, steps, warmup)
        out |= {"bare_bert_step_s": b_s, "bare_bert_tflop_per_step": fl[0][1] / 1e12,
                "bare_bert_samples_per_s": batch_size / b_s}
    return out


# ----------------------------------------------------------------------------------------------------------------


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()}-core CPU, {mem:.0f} GiB, {gpu}; {platform.python_version()}, torch {torch.__version__};"
            f" load average at start {load:.1f}")


def mfu_cell(r: dict) -> str:
    peak = r.get("peak_tflops")
    return f"{r['achieved_tflops_per_worker'] / peak:.2%}" if peak and "achieved_tflops_per_worker" in r else "–"


def bare_cell(r: dict) -> str:
    if "bare_bert_step_s" not in r:
        return "–"
    peak = r.get("peak_tflops")
    m = f" ({r['bare_bert_tflop_per_step'] / r['bare_bert_step_s'] / peak:.2%})" if peak else ""
    return f"{r['bare_bert_step_s']:.3f}{m}"


def table(rows: list[dict]) -> str:
    head = ("| preset | mode | workers x threads | batch | samples/s per worker | samples/s total | step (s) | "
            "data wait | first batch (s) | peak GPU mem | TFLOP/step | MFU | bare BERT s/step (MFU) |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        mem = f"{r['peak_gpu_mem_gib']:.1f} GiB" if "peak_gpu_mem_gib" in r else "–"
        total = r.get("samples_per_s_total", r["samples_per_s_per_worker"])
        mode = r["mode"] + (f" {r['amp']}" if r.get("amp") not in (None, "off") else "")
        first = f"{r['first_batch_s']:.2f}" if "first_batch_s" in r else "–"
        lines.append(f"| {r['preset']} | {mode} | {r['workers']} x {r.get('threads_per_worker', '-')} | "
                     f"{r['batch_size']} | {r['samples_per_s_per_worker']:.1f} | {total:.1f} | "
                     f"{r['step_s']:.2f} | {100 * r['data_wait_frac']:.1f} % | {first} | {mem} | "
                     f"{r.get('tflop_per_step', math.nan):.4f} | {mfu_cell(r)} | {bare_cell(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,paper")
    p.add_argument("--workers", default="1,2", help="Ray path: worker counts to compare")
    p.add_argument("--device", default="cpu", help="cpu (Ray Train workers) or cuda (one process, no Ray)")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16", "auto"], help="fp16: with loss scaling")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default: H200/H100 989, A100 312 bf16; V100 125, T4 65 fp16; CPU measured)")
    p.add_argument("--no-bare-bert", action="store_true", help="in-process path: skip the bare-BERT limit")
    p.add_argument("--batch-size", type=int, default=None, help="default: tiny 32, paper 8 on CPU / 32 on GPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per worker (default: tiny 20, paper 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--inproc", action="store_true", help="CPU too: one process, synthetic in-memory batches")
    p.add_argument("--stream", action="store_true",
                   help="data.materialize=false: stream the train shards from Parquet every epoch")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per Ray worker (default: the worker's CPU share, 2 / workers)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    presets = [s for s in args.presets.split(",") if s]
    workers = [int(w) for w in args.workers.split(",") if w]
    gpu = args.device.startswith("cuda")

    def bs(preset: str) -> int:
        return args.batch_size or (32 if preset == "tiny" or gpu else 8)

    def steps(preset: str) -> int:
        return args.steps or (20 if preset == "tiny" or gpu else 3)

    print(f"# {machine()}", flush=True)
    rows = []
    if gpu or args.inproc:
        for preset in presets:
            r = run_inproc(preset, args.device, args.amp, bs(preset), steps(preset), args.warmup,
                           bare=not args.no_bare_bert)
            print(json.dumps(r), flush=True)
            rows.append(r)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        runtime.init_ray(2)
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory(prefix="psamf-bench-") as tmp:
            need = max((args.warmup + steps(pr)) * bs(pr) * max(workers) for pr in presets)
            shards, manifest = prepare_data(tmp, need, 50)
            for preset in presets:
                for w in workers:
                    r = run_ray(preset, w, bs(preset), steps(preset), args.warmup, shards, manifest,
                                os.path.join(tmp, "runs"), args.threads, args.stream)
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    amp_name = {"bf16": "bf16", "fp16": "fp16"}.get(args.amp, "bf16" if args.amp == "auto" else "off")
    peak, peak_src = flops_mod.peak_tflops(args.device if gpu else "cpu", amp_name, args.peak_tflops)
    for r in rows:
        r["peak_tflops"], r["peak_source"] = peak, peak_src
        r["mfu"] = r["achieved_tflops_per_worker"] / peak
    print(f"# MFU against {peak:.3f} TFLOP/s ({peak_src})")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(), "command": " ".join(sys.argv), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
