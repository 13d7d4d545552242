"""One training epoch of MOSI-shaped data against the bare-BERT limit over the same batches (issue 11's CPU target).

For each batching mode, the train split's batches for epoch 0 come from the real pipeline (`psamf.data.load_datasets`
and `iter_batches` on an embedded local Ray, the run's DataConfig); they are collected first, so that the timings
hold no data wait (that is measured in "Training throughput"). Then:

    first pass `psamf.engine.train_epoch` over the batches with a fresh model: the training loop's own path (forward,
               the four loss terms, backward, clipping, Adam) plus every shape's first-time cost (kernel selection,
               allocator growth; with --compile, the compilations), as a worker session's first epoch pays it
    psamf      the same again, timed as a whole: the steady epoch
    bare BERT  a plain HF BertModel of the sentiment BERT's geometry, forward + backward + Adam on each batch at its
               padded token width (bench/step.py's BareBert), summed over the batches

and prints the padded share of token positions, both times, their ratio, and FLOPs / MFU (psamf.flops). The paper
preset reads a precomputed personality [CLS] (`data.use_precomputed_personality`, the shards' column): this bench
gives each batch a random `personality_cls` of the model's width instead of running a personality BERT in prepare,
which costs the training step the same.

    OMP_NUM_THREADS=2 .venv/bin/python bench/epoch.py --preset paper --modes shuffle,grouped,noise0.1,strict --threads 2
    .venv/bin/python bench/epoch.py --preset tiny --scale 0.3                                   # a quick check
    .venv/bin/python bench/epoch.py --preset tiny --modes grouped,buckets --compile             # torch.compile
    .venv/bin/python bench/epoch.py --preset tiny --modes grouped --compile --whole-model       # fails (see docs)
    python bench/epoch.py --preset paper --device cuda --amp bf16 --batch-size 128              # on a GPU (gpu.sh)

Modes: shuffle = `data.length_grouping=false`; grouped = the default (`length_grouping=true`, `length_noise=0.05`);
noise0.1 = more jitter; strict = grouping without jitter; buckets = grouped with token widths rounded up to 8 and frame
counts to 32 (`data.token_pad_multiple`, `data.frame_pad_multiple`), so that an epoch has few distinct shapes.
Synthetic MOSI (`psamf synth`, seeded), `psamf:tiny` tokenizer at MOSI's 50 tokens, random initialisation, no downloads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # bench/step.py

import psamf  # noqa: E402,F401  (before ray)

MODES = {"shuffle": ["data.length_grouping=false"], "grouped": ["data.length_grouping=true", "data.length_noise=0.05"],
         "noise0.1": ["data.length_grouping=true", "data.length_noise=0.1"],
         "strict": ["data.length_grouping=true", "data.length_noise=0.0"],
         "buckets": ["data.length_grouping=true", "data.length_noise=0.05", "data.token_pad_multiple=8",
                     "data.frame_pad_multiple=32"]}


def shards(work: str, scale: float) -> str:
    from psamf.prepare import prepare
    from psamf.synth import synthesize

    out = f"{work}/shards-{scale:g}"
    if not os.path.exists(f"{out}/manifest.json"):
        pkl = synthesize("mosi", "mmsa", f"{work}/mosi-{scale:g}", seed=0, scale=scale)["pickle"]
        prepare({"format": "mmsa", "input": str(pkl), "dataset": "mosi"}, out, tokenizer="psamf:tiny",
                personality_tokenizer="psamf:tiny", max_text_len=50)
    return out


def run_mode(mode: str, preset: str, uri: str, manifest: dict, batch_size: int | None, peak: float,
             max_batches: int | None, device: str = "cpu", amp: str = "off", compile_model: bool = False,
             whole_model: bool = False) -> dict:
    import torch

    from psamf import data, engine
    from psamf.config import Config
    from psamf.flops import mfu
    from psamf.model import build_model
    from step import BareBert  # bench/step.py
    from train import batch_flops  # bench/train.py

    cfg = Config.from_preset(preset).override([
        f"data.uri={uri}", "data.tokenizer=psamf:tiny", "data.personality_tokenizer=psamf:tiny",
        "data.max_text_len=50", "data.dataset=mosi", f"optim.amp='{amp}'", *MODES[mode],
        f"optim.compile={str(compile_model).lower()}",
        *([f"optim.batch_size={batch_size}"] if batch_size else [])])
    cfg.model.max_position_embeddings = max(cfg.model.max_position_embeddings, 50)
    bs = cfg.optim.batch_size
    train = data.load_datasets(cfg.data, manifest, ("train",))["train"]
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in data.iter_batches(train, cfg.data, bs, epoch=0, train=True, device="cpu"):
        b["personality_cls"] = torch.randn(len(b["label"]), cfg.model.hidden_size, generator=g)
        batches.append(b)
        if max_batches and len(batches) == max_batches:
            break
    widths = [int(b["input_ids"].shape[1]) for b in batches]
    fl, fl_bare = (sum(x) for x in zip(*(batch_flops(cfg, b) for b in batches)))  # (PSA-MF, bare BERT) per batch
    shapes = {(int(b["input_ids"].shape[1]), int(b["audio"].shape[1]), int(b["visual"].shape[1])) for b in batches}
    one_per_width = list({int(b["input_ids"].shape[1]): b for b in batches}.values())
    dev = torch.device(device)
    amp_dtype = engine.resolve_amp(cfg.optim.amp, dev)
    scaler = engine.make_scaler(amp_dtype, dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    model = build_model(cfg.model, with_personality_encoder=False).to(dev).train()
    if compile_model and whole_model:
        model.compile()  # what optim.compile did before 2026-12-02 (docs/benchmarks.md, "torch.compile")
    else:
        engine.maybe_compile(model, cfg.optim)
    opt = engine.build_optimizer(model, cfg.optim)
    if compile_model:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    # first pass over the batches on a fresh model: every shape's first-time cost (kernel selection, allocator
    # growth; with --compile the compilations), as a worker session's first epoch pays it. Then the timed pass.
    sync()
    first = engine.train_epoch(model, batches, opt, cfg, device=dev, amp_dtype=amp_dtype, scaler=scaler)
    sync()
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) if compile_model else None
    st = engine.train_epoch(model, batches, opt, cfg, device=dev, amp_dtype=amp_dtype, scaler=scaler)
    sync()
    peak_mem = round(torch.cuda.max_memory_allocated() / 2**30, 3) if dev.type == "cuda" else None
    del model, opt

    bare = BareBert(cfg, dev, amp_dtype)
    for b in one_per_width:
        bare.step(b)  # warm-up, untimed: one step per token width (kernel selection, allocator)
    sync()
    t0 = time.perf_counter()
    for b in batches:
        bare.step(b)
    sync()
    bare_s = time.perf_counter() - t0
    return {
        "mode": mode, "overrides": MODES[mode], "preset": preset, "batch_size": bs, "batches": len(batches),
        "samples": sum(len(b["label"]) for b in batches), "padded_token_frac": round(1 - st.tokens / st.token_slots, 4),
        "mean_padded_width": round(sum(widths) / len(widths), 2), "distinct_widths": len(set(widths)),
        "distinct_shapes": len(shapes), "compile": ("whole model" if whole_model else "bert layers")
        if compile_model else False, "compiled_graphs": graphs,
        "first_pass_s": round(first.time, 2), "first_over_epoch": round(first.time / st.time, 3),
        "epoch_s": round(st.time, 2), "bare_bert_s": round(bare_s, 2), "epoch_over_bare": round(st.time / bare_s, 3),
        "samples_per_s": round(st.n / st.time, 2), "bare_bert_samples_per_s": round(st.n / bare_s, 2),
        "epoch_tflop": round(fl / 1e12, 3), "bare_bert_tflop": round(fl_bare / 1e12, 3),
        "mfu": round(mfu(fl, st.time, peak), 4), "bare_bert_mfu": round(mfu(fl_bare, bare_s, peak), 4),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off", "peak_gpu_mem_gib": peak_mem,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--modes", default="shuffle,grouped")
    p.add_argument("--scale", type=float, default=1.0, help="synthetic MOSI scale (1.0: 1,284 train rows)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's (paper 32)")
    p.add_argument("--max-batches", type=int, default=None, help="stop the epoch after this many batches")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast (fp16 with loss scaling)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: psamf.flops.peak_tflops)")
    p.add_argument("--compile", action="store_true", help="optim.compile: the first pass includes compiling")
    p.add_argument("--whole-model", action="store_true",
                   help="with --compile: compile the whole model instead (fails in torch 2.13 on varied shapes)")
    p.add_argument("--work", default="/tmp/psamf-bench-epoch")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)

    import ray
    import torch

    from psamf import runtime
    from psamf.flops import peak_tflops
    from psamf.shards import read_manifest

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    uri = shards(args.work, args.scale)
    manifest = read_manifest(uri)
    runtime.init_ray(1)
    peak, peak_src = peak_tflops(args.device, args.amp, args.peak_tflops)
    rows = []
    try:
        for mode in args.modes.split(","):
            r = run_mode(mode.strip(), args.preset, uri, manifest, args.batch_size, peak, args.max_batches,
                         args.device, args.amp, args.compile, args.whole_model)
            rows.append(r)
            print(json.dumps(r), flush=True)
    finally:
        ray.shutdown()
    info = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "peak_tflops": round(peak, 4), "peak_source": peak_src,
            "scale": args.scale}
    print(json.dumps(info))
    print("| batches | padded tokens | mean width | widths | shapes | first pass (s) | epoch (s) | bare BERT (s) | "
          "epoch / bare | samples/s | MFU | bare MFU |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {100 * r['padded_token_frac']:.1f} % | {r['mean_padded_width']} "
              f"| {r['distinct_widths']} | {r['distinct_shapes']} | {r['first_pass_s']} | {r['epoch_s']} "
              f"| {r['bare_bert_s']} | {r['epoch_over_bare']} | {r['samples_per_s']} | {r['mfu']:.1%} "
              f"| {r['bare_bert_mfu']:.1%} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
