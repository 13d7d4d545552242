"""The Ray Train controller's poll interval (`run.controller_poll_s`): how it sets the floor under an epoch.

Every epoch ends with `ray.train.report` and a wait until the controller has registered the report (so that a worker
that dies right after cannot lose the epoch's checkpoint). The controller registers reports when it polls the
workers, every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S` (Ray's default 2 s; psamf's default 0.25 s). This script starts
the embedded Ray as `psamf train` does, writes a synthetic MOSI-shaped data set (scale 1: 1,284 / 229 / 686 clips,
`psamf:tiny` tokens), then trains the `tiny` preset for `--epochs` epochs once per (repeat, interval), the intervals
alternating, and prints one JSON line per run:

- `fit_s`: the whole `psamf.train.fit` (splits loaded; `trainer.fit()`: controller and worker start, epochs, final
  evaluation, end; the run's outputs written);
- `epoch_period_s`: the mean difference of consecutive history records' `ended_at` (train + validation +
  checkpoint + report + the wait), over the epochs after the first;
- `train_s`, `eval_s`: the same epochs' mean `time_train_s` and `time_eval_s`; `rest_s`: period - train - eval
  (progress files, checkpoint, report and the wait for its registration).

    OMP_NUM_THREADS=1 .venv/bin/python bench/controller_poll.py --intervals 0.25 2.0 --repeats 3 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import psamf.train as T  # noqa: E402  (psamf before ray)
from psamf import runtime  # noqa: E402
from psamf.config import Config  # noqa: E402
from psamf.prepare import prepare  # noqa: E402
from psamf.synth import synthesize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intervals", type=float, nargs="+", default=[0.25, 2.0], help="poll intervals (s), alternated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="synthetic MOSI split sizes relative to the real ones")
    args = ap.parse_args()
    if runtime.POLL_ENV in os.environ:
        ap.error(f"unset {runtime.POLL_ENV}: it would override every interval this script sets")

    import ray

    runtime.init_ray(args.workers)
    root = tempfile.mkdtemp(prefix="psamf-poll-")
    paths = synthesize("mosi", "mmsa", root + "/synth", seed=0, scale=args.scale)
    prepare({"format": "mmsa", "input": str(paths["pickle"]), "dataset": "mosi"}, root + "/shards",
            tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny")
    for rep in range(args.repeats):
        for iv in args.intervals:
            cfg = Config.from_preset("tiny").override([
                f"data.uri={root}/shards", f"run.num_workers={args.workers}", f"optim.epochs={args.epochs}",
                f"run.storage_path={root}/runs", f"run.name=r{rep}-{iv}", f"run.controller_poll_s={iv}"])
            pf = T.preflight(cfg)
            t = time.perf_counter()
            res = T.fit(pf)
            wall = time.perf_counter() - t
            h = res.history
            later = h[1:]
            period = statistics.fmean(b["ended_at"] - a["ended_at"] for a, b in zip(h, h[1:]))
            train = statistics.fmean(r["time_train_s"] for r in later)
            ev = statistics.fmean(r["time_eval_s"] for r in later)
            print(json.dumps({"repeat": rep, "interval_s": iv, "workers": args.workers, "epochs": args.epochs,
                              "seen_by_workers": res.metrics["controller_poll_s"], "fit_s": round(wall, 2),
                              "epoch_period_s": round(period, 3), "train_s": round(train, 3), "eval_s": round(ev, 3),
                              "rest_s": round(period - train - ev, 3),
                              "epoch0_train_s": round(h[0]["time_train_s"], 3)}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
