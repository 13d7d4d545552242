"""Checks of the code paths that only run on a GPU, for `bench/gpu.sh` (its first stage, a few seconds).

    python bench/gpu_checks.py --device cuda --out checks.json
    python bench/gpu_checks.py --device cpu --out checks.json     # the parts that also run on a CPU

The CI machine has no GPU, so these paths are exercised here, whenever a GPU machine is lent:
  host_copy       `engine.HostCopy` (the loss terms' copy, queued before the backward pass into page-locked memory
                  and read after it) returns the values of when it was made, although the device has since changed
                  the tensor;
  pin_batch       `data.pin_batch` (what `iter_batches(pin_memory=True)` does on Ray's collate threads) puts every
                  tensor in page-locked memory except the frame lengths, which stay ordinary host tensors;
  loop            `engine.train_epoch` over page-locked host batches gives the same loss sums, gradient norms and
                  weights as over the same batches already on the device (the tiny preset, 3 steps, float32);
                  `engine.memory_stats` reports the peak GPU memory.
Writes one JSON object ({"ok": bool, ...}) and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch

from psamf import engine
from psamf.config import Config
from psamf.data import pin_batch
from psamf.model import HOST_INPUT_KEYS, build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import synthetic_batch  # noqa: E402  (bench/step.py)


def check_host_copy(dev: torch.device) -> dict:
    t = torch.arange(4, dtype=torch.float32, device=dev)
    copy = engine.HostCopy(t)
    t.mul_(10)  # queued after the copy
    got = copy.tolist()
    return {"ok": got == [0.0, 1.0, 2.0, 3.0], "got": got}


def check_pin_batch(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"ok": True, "not_applicable": "page-locked memory needs CUDA"}
    cfg = Config.from_preset("tiny")
    pinned = pin_batch(synthetic_batch(cfg.model, 4, 16, 20, 20, "cpu"))
    wrong = [k for k, v in pinned.items() if isinstance(v, torch.Tensor) and v.is_pinned() == (k in HOST_INPUT_KEYS)]
    return {"ok": not wrong, "wrong_keys": wrong}


def check_loop(dev: torch.device) -> dict:
    cfg = Config.from_preset("tiny")
    batches = [synthetic_batch(cfg.model, 8, 16, 40, 50, "cpu", seed=s) for s in range(3)]
    runs = {}
    for name in ("device", "host"):
        engine.seed_everything(0)
        model = build_model(cfg.model).to(dev)
        opt = engine.build_optimizer(model, cfg.optim)
        if name == "device":
            feed = [engine.move_to_device(b, dev) for b in batches]
        else:
            feed = [pin_batch(b) for b in batches] if dev.type == "cuda" else batches
        engine.seed_everything(1)
        st = engine.train_epoch(model, feed, opt, cfg, device=dev)
        runs[name] = (st, {k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    (a, wa), (b, wb) = runs["device"], runs["host"]
    loss_diff = max(abs(a.sums[k] - b.sums[k]) / max(1e-12, abs(a.sums[k])) for k in a.sums)
    norm_diff = max(abs(x - y) / max(1e-12, abs(x)) for x, y in zip(a.grad_norms, b.grad_norms))
    w_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    mem = engine.memory_stats(dev)  # what every epoch's history record gets
    del runs, wa, wb
    engine.release_memory()  # what a trial in a reused actor calls at its end (empties the CUDA cache)
    ok = (loss_diff < 1e-4 and norm_diff < 1e-4 and w_diff < 1e-4 and a.steps == b.steps == 3
          and (dev.type != "cuda" or mem.get("peak_gpu_mem_gib", 0) > 0))
    return {"ok": ok, "loss_sums_max_rel_diff": loss_diff, "grad_norm_max_rel_diff": norm_diff,
            "weights_max_abs_diff": w_diff, "steps": b.steps, "memory_stats": mem}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device(args.device)
    out: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    for name, fn in (("host_copy", check_host_copy), ("pin_batch", check_pin_batch), ("loop", check_loop)):
        try:
            out[name] = fn(dev)
        except Exception:  # noqa: BLE001 - recorded, and the run fails below
            out[name] = {"ok": False, "error": traceback.format_exc(limit=4)}
    out["ok"] = all(out[k]["ok"] for k in ("host_copy", "pin_batch", "loop"))
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
