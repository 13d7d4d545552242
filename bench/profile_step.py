"""Where a train step's time goes: torch.profiler over `psamf.engine.train_step`, plus a host-sync census.

    python bench/profile_step.py --preset paper --batch-size 16            # CPU, random init, precomputed CLS_p
    python bench/profile_step.py --preset tiny --batch-size 32 --steps 5
    python bench/profile_step.py --preset paper --device cuda --amp bf16 --batch-size 128 --out prof.json

Inputs are MOSI-shaped as `bench/step.py` builds them (50 text tokens, audio up to 375 x 5, visual up to 500 x 20,
true lengths drawn like the real data), with the personality [CLS] precomputed (as users run it), moved to the device
the way the training loop moves them (`engine.move_to_device`).

Two tables:
- **phases**: wall time per part of the step, from `record_function` ranges opened by module hooks (forward of the
  LSTM encoders, the text BERT layers, the multimodal layers, the cross-modal attention blocks, the fusion head),
  and around the losses, backward, clipping and the optimiser (this script wraps `engine`'s public pieces the same
  way `train_step` runs them);
- **top ops**: self time per aten op over the whole step (forward and backward), grouped into families
  (matmuls, LSTM, attention/softmax, normalisation, elementwise, optimiser).
Host syncs: every data-dependent read of a tensor on the step's path (`.item()`, `float()`, `bool()` of a tensor,
`.cpu()`, `.tolist()`, `.numpy()`, `nonzero`), counted per step with the line that asked for it. On a CPU these cost
nothing; on a GPU each one stalls the host until the queued kernels finish.
Prints Markdown; `--out FILE.json` also writes the numbers.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import sys
import time
import traceback
from typing import Any, Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after site-packages: bench/ must not shadow stdlib

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from psamf import engine  # noqa: E402
from psamf.config import Config  # noqa: E402
from psamf.model import build_model  # noqa: E402
from step import synthetic_batch  # noqa: E402  (bench/step.py)

# op-name substrings -> family, first match wins (aten names, forward and autograd backward nodes)
OP_FAMILIES = (
    ("optimizer (Adam)", ("adam", "_foreach")),
    ("LSTM", ("lstm", "rnn", "pack_padded", "pad_packed")),
    ("attention / softmax", ("scaled_dot_product", "softmax", "_efficient_attention", "flash", "baddbmm")),
    ("matmul (linear / mm / bmm)", ("addmm", "aten::mm", "bmm", "matmul", "linear", "mmbackward", "addmmbackward")),
    ("layer norm", ("layer_norm", "native_layer_norm")),
    ("embedding", ("embedding",)),
    ("dropout", ("dropout", "bernoulli")),
    ("loss (cross entropy, l1)", ("cross_entropy", "nll_loss", "log_softmax")),
    ("copies / casts / cat", ("copy_", "_to_copy", "cat", "clone", "contiguous", "index_select", "stack")),
)

PHASE_MODULES = {  # top-level PSAMF children -> phase name
    "visual_enc": "fwd: LSTM encoders", "acoustic_enc": "fwd: LSTM encoders",
    "mm_layers": "fwd: multimodal BERT layers",
    "attention_v": "fwd: cross-modal attention", "attention_a": "fwd: cross-modal attention",
    "post_v": "fwd: cross-modal attention", "post_a": "fwd: cross-modal attention",
    "fusion_prj": "fwd: fusion + head", "ys": "fwd: fusion + head", "cnn": "fwd: fusion + head",
    "v_dim_v": "fwd: fusion + head", "a_dim_v": "fwd: fusion + head", "layer_norm": "fwd: fusion + head",
}


def family(name: str) -> str:
    n = name.lower()
    for fam, keys in OP_FAMILIES:
        if any(k in n for k in keys):
            return fam
    return "other (elementwise, reductions, ...)"


def add_phase_hooks(model: torch.nn.Module) -> None:
    """record_function ranges around the forward of the step's parts (module hooks: no change to the model)."""
    ctx: dict[int, Any] = {}

    def pre(name: str) -> Callable:
        def hook(mod, args, kwargs=None):  # noqa: ANN001
            rf = record_function(name)
            rf.__enter__()
            ctx.setdefault(id(mod), []).append(rf)
        return hook

    def post(mod, args, out):  # noqa: ANN001
        ctx[id(mod)].pop().__exit__(None, None, None)

    for child, phase in PHASE_MODULES.items():
        if hasattr(model, child):
            m = getattr(model, child)
            m.register_forward_pre_hook(pre(phase))
            m.register_forward_hook(post)
    for layer in model.text_bert.encoder.layer:
        layer.register_forward_pre_hook(pre("fwd: text BERT layers"))
        layer.register_forward_hook(post)
    model.text_bert.embeddings.register_forward_pre_hook(pre("fwd: embeddings"))
    model.text_bert.embeddings.register_forward_hook(post)


EVAL_BATCHES = 3  # the evaluation census: a pass this long, so that per-batch reads show as multiples of 3


class SyncCensus(TorchDispatchMode):
    """Counts the aten ops that read tensor data on the host (a device->host sync on a GPU), by call site."""

    SYNC_OPS = ("_local_scalar_dense", "is_nonzero", "nonzero", "equal")

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if any(func.__name__.startswith(s) for s in self.SYNC_OPS):
            self.sites[f"{func.__name__} @ {call_site()}"] += 1
        return func(*args, **(kwargs or {}))


def call_site() -> str:
    """The innermost frame in psamf/ or transformers/ (else torch/nn) that led here."""
    frames = traceback.extract_stack()[:-1]  # without this frame; the innermost psamf frame is the caller
    for want in ("psamf" + os.sep, "transformers" + os.sep, os.sep.join(("torch", "nn"))):
        for f in reversed(frames):
            if want in f.filename and "bench" + os.sep not in f.filename:
                short = f.filename[f.filename.rfind(want.split(os.sep)[0]):]
                return f"{short}:{f.lineno} ({f.name})"
    return "?"


@contextlib.contextmanager
def host_copy_census(sites: collections.Counter) -> Iterator[None]:
    """Counts `.cpu()`, `.tolist()`, `.numpy()` calls (on a CPU tensor `.cpu()` dispatches nothing, so the dispatch
    mode alone would miss it) by call site, by wrapping the three Tensor methods for the duration."""
    saved = {n: getattr(torch.Tensor, n) for n in ("cpu", "tolist", "numpy")}

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(self, *a, **k):  # noqa: ANN001
            sites[f".{name}() @ {call_site()}"] += 1
            return fn(self, *a, **k)
        return counted

    for n, fn in saved.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


def setup(preset: str, batch_size: int, device: str, amp: str, shapes: tuple[int, int, int] = (50, 375, 500)) -> tuple:
    cfg = Config.from_preset(preset).override([f"optim.batch_size={batch_size}", f"optim.amp='{amp}'"])
    dev = torch.device(device)
    engine.seed_everything(0)
    model = build_model(cfg.model, with_personality_encoder=False).to(dev).train()
    opt = engine.build_optimizer(model, cfg.optim)
    amp_dtype = engine.resolve_amp(cfg.optim.amp, dev)
    batch = synthetic_batch(cfg.model, batch_size, *shapes, "cpu")
    for k in [k for k in batch if k.startswith("p_")]:
        del batch[k]
    batch["personality_cls"] = torch.randn(batch_size, model.personality_dim)
    return cfg, dev, model, opt, amp_dtype, engine.make_scaler(amp_dtype, dev), batch


def phased_step(model, batch, opt, cfg, dev, amp_dtype, scaler) -> None:  # noqa: ANN001
    """`engine.train_step`, with a profiler range around each part (same calls, same order)."""
    with record_function("step: move to device"):
        b = engine.move_to_device(batch, dev)
    opt.zero_grad(set_to_none=True)
    with record_function("step: forward + losses + backward"):
        stats = engine.forward_backward(model, b, cfg, dev, amp_dtype, scaler, 1.0)
    with record_function("step: clip + optimizer"):
        engine.optimizer_step(model, opt, cfg, scaler)
    return stats


def run(preset: str, batch_size: int, steps: int, device: str, amp: str,
        shapes: tuple[int, int, int] = (50, 375, 500)) -> dict:
    cfg, dev, model, opt, amp_dtype, scaler, batch = setup(preset, batch_size, device, amp, shapes)
    add_phase_hooks(model)
    phased_step(model, batch, opt, cfg, dev, amp_dtype, scaler)  # warm-up (allocations, kernel choices)
    sites: collections.Counter[str] = collections.Counter()
    census = SyncCensus()
    with census, host_copy_census(sites):  # the training loop's own path (train_step also floats the grad norm)
        engine.train_epoch(model, [batch], opt, cfg, device=dev, amp_dtype=amp_dtype, scaler=scaler)
    sites.update(census.sites)
    eval_sites: collections.Counter[str] = collections.Counter()
    census = SyncCensus()
    labelled = dict(batch, sample_id=[f"s{i}" for i in range(batch_size)])
    with census, host_copy_census(eval_sites):  # a validation pass of EVAL_BATCHES batches, the loop's own path
        engine.evaluate(model, [labelled] * EVAL_BATCHES, cfg, device=dev, amp_dtype=amp_dtype)
    eval_sites.update(census.sites)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            phased_step(model, batch, opt, cfg, dev, amp_dtype, scaler)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    return {"preset": preset, "batch_size": batch_size, "device": device_name(dev), "amp": str(amp_dtype),
            "steps": steps, "step_s": wall, **tables(prof, steps, dev), "host_syncs_per_step": dict(sites),
            "host_syncs_per_eval_pass": dict(eval_sites), "eval_pass_batches": EVAL_BATCHES}


def tables(prof, steps: int, dev: torch.device) -> dict:  # noqa: ANN001
    """Phase ranges (total time) and op families (self time), per step, from the profiler's averages."""
    use_dev = dev.type == "cuda"
    phases: dict[str, float] = collections.defaultdict(float)
    fams: dict[str, float] = collections.defaultdict(float)
    ops: dict[str, float] = collections.defaultdict(float)
    for ev in prof.key_averages():
        if ev.key.startswith(("fwd: ", "step: ")):
            phases[ev.key] += (ev.device_time_total if use_dev else ev.cpu_time_total) / 1e6 / steps
            continue
        self_t = (ev.self_device_time_total if use_dev else ev.self_cpu_time_total) / 1e6 / steps
        if ev.key.startswith("Optimizer.") or ev.key.startswith("ProfilerStep"):
            continue
        ops[ev.key] += self_t
        fams[family(ev.key)] += self_t
    return {"phases_s": dict(phases), "families_s": dict(sorted(fams.items(), key=lambda kv: -kv[1])),
            "top_ops_s": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:15])}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def markdown(r: dict) -> str:
    step = r["step_s"]
    lines = [f"**{r['preset']}**, batch {r['batch_size']}, {r['device']}, amp {r['amp']}: "
             f"{step:.3f} s per profiled step ({r['steps']} steps)", "",
             "| phase (wall, inclusive) | s / step | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.4f} | {v / step:.0%} |" for k, v in sorted(r["phases_s"].items())]
    lines += ["", "| op family (self time, fwd + bwd) | s / step | share |", "|---|---:|---:|"]
    tot = sum(r["families_s"].values()) or 1.0
    lines += [f"| {k} | {v:.4f} | {v / tot:.0%} |" for k, v in r["families_s"].items()]
    lines += ["", "| top ops (self time) | s / step |", "|---|---:|"]
    lines += [f"| `{k}` | {v:.4f} |" for k, v in r["top_ops_s"].items()]
    lines += ["", f"Host syncs per step: {sum(r['host_syncs_per_step'].values())}", ""]
    lines += [f"- {n} x `{k}`" for k, n in sorted(r["host_syncs_per_step"].items())]
    lines += ["", f"Host syncs per validation pass of {r['eval_pass_batches']} batches: "
              f"{sum(r['host_syncs_per_eval_pass'].values())}", ""]
    lines += [f"- {n} x `{k}`" for k, n in sorted(r["host_syncs_per_eval_pass"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16", "auto"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: robust on a shared machine, where spinning OpenMP threads stall)")
    ap.add_argument("--text-len", type=int, default=50)
    ap.add_argument("--audio-frames", type=int, default=375, help="MOSI audio max 375")
    ap.add_argument("--visual-frames", type=int, default=500, help="MOSI vision max 500")
    ap.add_argument("--out", default=None, help="write the numbers as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = run(args.preset, args.batch_size, args.steps, args.device, args.amp,
            (args.text_len, args.audio_frames, args.visual_frames))
    print(markdown(r), flush=True)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(r, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
