"""`psamf demo`: the whole pipeline on the embedded default, in a few minutes on a 2-core CPU.

    synth (MOSI-shaped, seeded)  ->  prepare (local Parquet shards + manifest, precomputed CLS_p)
    ->  train the `tiny` preset with 2 DDP workers on an embedded local Ray  ->  select on validation
    ->  evaluate test once  ->  print the metric table, write metrics.json, predictions, TensorBoard
        events and a PNG of the training curves under the run directory
    ->  a 4-trial Ray Tune search of the tiny preset (Optuna + ASHA, `--no-search` skips it): trial table,
        best.yaml, plots, TensorBoard HParams, the best trial's checkpoint evaluated once on test.

Every step is the public API a user would call (`psamf.synth.synthesize`, `psamf.prepare.prepare`,
`psamf.train.train`, `psamf.tune.run_search`); nothing here is demo-only logic.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="data/demo", help="where the raw synthetic corpus and the shards go")
    p.add_argument("--storage", default="runs", help="run storage path (local dir or s3://...)")
    p.add_argument("--run-name", default="demo", help="run name; the demo starts it afresh unless --resume")
    p.add_argument("--resume", action="store_true", help="resume the run of that name instead of starting afresh")
    p.add_argument("--scale", type=float, default=0.5, help="synthetic corpus size relative to real MOSI")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train DDP workers")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus and of training")
    p.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, a 4-trial Ray Tune search of the tiny preset with ASHA (default: on)")


# The demo's search (as jobs/search/tiny-demo.yaml, on the demo's shards): 4 Optuna trials, 3 epochs each, ASHA,
# each trial training in its own process (`workers_per_trial: 0`: no Ray Train worker group to start per trial).
DEMO_SEARCH = {
    "base": {"preset": "tiny", "overrides": {"optim.epochs": 3}},
    "metric": "val_mae", "mode": "min", "num_samples": 4, "search": "optuna", "scheduler": "asha",
    "grace_period": 1, "reduction_factor": 2, "workers_per_trial": 0, "seed": 0,
    "space": {
        "optim.lr_main": {"loguniform": [1.0e-3, 1.0e-2]},
        "optim.lr_bert": {"loguniform": [1.0e-4, 3.0e-3]},
        "model.align_layer": {"randint": [0, 2]},
        "loss.w_ccl": {"uniform": [0.0, 1.0]},
        "model.sim_mode": {"choice": ["batch_dissimilarity", "per_sample_dissimilarity"]},
    },
}


def _search(args: argparse.Namespace, shards: Path) -> None:
    from psamf.tune import SearchSpace, run_search

    d = dict(DEMO_SEARCH, base={"preset": "tiny", "overrides": {
        **DEMO_SEARCH["base"]["overrides"], "data.uri": str(shards), "run.storage_path": args.storage}})
    name = f"{args.run_name}-search"
    search_dir = Path(args.storage) / name
    if search_dir.exists() and "://" not in args.storage:
        shutil.rmtree(search_dir)  # the demo starts afresh; `psamf tune --resume NAME` continues a search
    result = run_search(SearchSpace.from_dict(d, source="psamf demo"), name=name, storage_path=args.storage)
    print(f"search directory: {result.path}  (trials.csv, best.yaml, plots/; tensorboard --logdir {result.path})")


def run(args: argparse.Namespace) -> int:
    import logging
    import warnings

    from psamf.config import Config
    from psamf.prepare import prepare
    from psamf.sources import read_source
    from psamf.runtime import init_ray
    from psamf.sources import ChecksumMismatchWarning
    from psamf.synth import synthesize
    from psamf.train import train

    t0 = time.perf_counter()
    steps = 5 if getattr(args, "search", True) else 4
    work = Path(args.workdir)
    raw_dir, shards = work / "raw-mosi", work / "shards-mosi"
    cfg = Config.from_preset("tiny").override([
        f"data.uri={shards}", f"run.storage_path={args.storage}", f"run.name={args.run_name}",
        f"run.num_workers={args.workers}", f"optim.epochs={args.epochs}", f"optim.seed={args.seed}",
    ])

    print(f"[1/{steps}] synth: MOSI-shaped corpus, seed {args.seed}, scale {args.scale} -> {raw_dir}", flush=True)
    files = synthesize("mosi", "mmsa", raw_dir, seed=args.seed, scale=args.scale)

    print(f"[2/{steps}] prepare: tokenise ({cfg.data.tokenizer}), precompute personality CLS -> {shards}\n"
          "      (Ray may log an `E ... core_worker.cc ... constructor arguments in the object store` line for this "
          "actor pool: harmless, a known Ray 2.60 message)", flush=True)
    init_ray(args.workers)  # one embedded Ray for the personality pass and training (or RAY_ADDRESS's cluster)
    with warnings.catch_warnings():
        # the synthetic file cannot match the published MOSI checksum; real files are still checked loudly
        warnings.simplefilter("ignore", ChecksumMismatchWarning)
        logging.getLogger("psamf.sources").setLevel(logging.ERROR)
        raw = read_source("mmsa", str(files["pickle"]), name="mosi")
        logging.getLogger("psamf.sources").setLevel(logging.NOTSET)
    manifest = prepare(raw, str(shards),
                       tokenizer=cfg.data.tokenizer, personality_tokenizer=cfg.data.personality_tokenizer,
                       max_text_len=cfg.data.max_text_len, personality_model=cfg.model)
    print(f"      shards ready: {manifest['counts']}", flush=True)

    run_dir = Path(args.storage) / args.run_name
    if not args.resume and run_dir.exists() and "://" not in args.storage:
        shutil.rmtree(run_dir)  # the demo starts afresh; real runs resume by name
    from psamf.runtime import embedded, quiet, session_log_dir

    where = "embedded local Ray" if embedded() else f"the Ray cluster at {os.environ.get('RAY_ADDRESS')}"
    print(f"[3/{steps}] train: tiny preset, {args.workers} DDP workers, {args.epochs} epochs, {where}"
          + (f" (worker logs: {session_log_dir()}; PSAMF_RAY_LOGS=1 streams them)" if quiet() else ""),
          flush=True)
    result = train(cfg)

    print(f"[4/{steps}] evaluate: model selected on validation, test evaluated once", flush=True)
    print(result.table or "", flush=True)
    floors = (result.metrics.get("baselines") or {}).get("test") or {}
    if floors:
        from psamf.results import floors_line

        print(floors_line(floors))
    from psamf.results import chance_line

    if (line := chance_line(result.metrics)) is not None:
        print(line + " (usual for the tiny preset's few epochs on synthetic data: docs/user-guide.md §5)")
    print(f"run directory: {result.run_dir}")
    for key in ("metrics", "predictions", "curves", "tensorboard", "config"):
        if key in result.paths:
            print(f"  {key:12s} {result.paths[key]}")
    if steps == 5:
        print(f"[5/5] search: 4 trials of the tiny preset, Optuna + ASHA on val_mae", flush=True)
        _search(args, shards)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0
