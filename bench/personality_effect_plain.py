"""PSA-MF rows of the personality-effect comparison without Ray (docs/benchmarks.md "Personality pretraining").

The same training step, evaluation, plateau schedule and validation-only selection as `psamf train`
(`psamf.engine`), run in this process on prepared shards read with pyarrow; batches are drawn by a seeded
permutation instead of Ray Data's shuffle, so a seed here is not the same run as the seed in `psamf train`.
Written because on the loaded 2-core bench machine the embedded Ray of `bench/personality_effect.py` repeatedly
timed out at start-up ("The current node timed out during startup"). Prints the test MAE of the
validation-selected epoch per seed and mean ± population std.

    PYTHONPATH=. .venv/bin/python bench/personality_effect_plain.py --shards SHARDS --row pretrained \
        --encoder ENCODER_DIR --seeds 1,2 --epochs 8

`--row`: pretrained (model.personality_model=ENCODER_DIR), untrained (the tiny preset's seeded random encoder),
none (the `no_personality` ablation). Shards prepared without `--personality-model` (no precomputed CLS_p):
each row's model runs its own frozen personality encoder on the shards' personality tokens.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _batches(table, batch_size: int, collate, rng: np.random.Generator | None):
    """A split's batches: shuffled and full batches only with `rng` (training), else all rows in order."""
    idx = rng.permutation(table.num_rows) if rng is not None else np.arange(table.num_rows)
    for lo in range(0, len(idx), batch_size):
        sel = idx[lo:lo + batch_size]
        if rng is not None and len(sel) < batch_size:
            return
        yield collate(table.take(sel))


def train_and_test(cfg, seed: int, epochs: int) -> tuple[float, int]:
    """(test MAE of the validation-selected epoch, that epoch) of one run."""
    import pyarrow.parquet as pq

    from psamf.data import PadCollate
    from psamf.engine import build_optimizer, build_scheduler, eval_metrics, evaluate, seed_everything, train_epoch
    from psamf.model import build_model
    from psamf.shards import read_manifest

    man = read_manifest(cfg.data.uri)
    tables = {s: pq.read_table([f"{cfg.data.uri}/{sh['path']}" for sh in man["shards"] if sh["split"] == s])
              for s in ("train", "valid", "test")}
    collate = PadCollate(cfg.data, manifest=man, sample_ids=True)
    seed_everything(seed)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim)
    rng = np.random.default_rng(seed)
    best_mae, best_state, best_epoch = float("inf"), None, -1
    for epoch in range(epochs):
        train_epoch(model, _batches(tables["train"], cfg.optim.batch_size, collate, rng), opt, cfg)
        val = eval_metrics(evaluate(model, _batches(tables["valid"], 64, collate, None), cfg), cfg.data.dataset)
        sched.step(val["val_loss"])
        if val["val_mae"] <= best_mae:  # later epoch on ties, as psamf.engine.Selector
            best_mae, best_state, best_epoch = val["val_mae"], copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    test = eval_metrics(evaluate(model, _batches(tables["test"], 64, collate, None), cfg), cfg.data.dataset, "test_")
    return float(test["test_mae"]), best_epoch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--row", choices=("pretrained", "untrained", "none"), required=True)
    p.add_argument("--encoder", default=None, help="pretrained encoder directory (row pretrained)")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--epochs", type=int, default=8)
    args = p.parse_args()
    import torch

    from psamf.config import Config, ablate

    torch.set_num_threads(1)
    base = Config.from_preset("tiny").replace({"data.uri": os.path.abspath(args.shards)})
    if args.row == "pretrained":
        if not args.encoder:
            p.error("--row pretrained needs --encoder")
        cfg = base.replace({"model.personality_model": args.encoder})
    else:
        cfg = ablate(base, "no_personality") if args.row == "none" else base
    maes = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        mae, epoch = train_and_test(cfg, seed, args.epochs)
        maes.append(mae)
        print(f"{args.row} seed {seed}: test MAE {mae:.4f} (epoch {epoch}, {time.perf_counter() - t0:.0f} s)",
              flush=True)
    print(f"{args.row}: test MAE {np.mean(maes):.3f} ± {np.std(maes):.3f} over {len(maes)} seeds", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
