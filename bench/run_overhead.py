"""Fixed cost of one Ray Train run: the floor under every integration test that trains.

Starts the embedded Ray as `psamf train` does (`psamf.runtime.init_ray`: 127.0.0.1, 4 logical CPUs for up to 2
workers; token auth off, as in the tests), writes a small synthetic MOSI-shaped data set (scale 0.15:
about 190 / 34 / 100 clips, `psamf:tiny` tokens), then trains the `tiny` preset for one epoch once per entry of
`--workers` (a new run name each time) and prints the wall time of each run. Everything a run pays besides its
one epoch (the Train controller and worker group, worker setup, Ray Data's executors, checkpoint, outputs) is the
overhead that the test suite pays per run; docs/benchmarks.md, "Test-suite time", has the figures.

    OMP_NUM_THREADS=1 .venv/bin/python bench/run_overhead.py --workers 1 1 2
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 1, 2], help="one run per entry: its worker count")
    args = ap.parse_args()

    import ray

    t0 = time.perf_counter()
    runtime.init_ray(max(args.workers))
    print(json.dumps({"stage": "ray_init", "s": round(time.perf_counter() - t0, 1)}), flush=True)
    root = tempfile.mkdtemp(prefix="psamf-overhead-")
    t = time.perf_counter()
    paths = synthesize("mosi", "mmsa", root + "/synth", seed=0, scale=0.15)
    prepare({"format": "mmsa", "input": str(paths["pickle"]), "dataset": "mosi"}, root + "/shards",
            tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny", max_text_len=32)
    print(json.dumps({"stage": "synth_prepare", "s": round(time.perf_counter() - t, 1)}), flush=True)
    for i, nw in enumerate(args.workers):
        t = time.perf_counter()
        cfg = Config.from_preset("tiny").override([f"data.uri={root}/shards", f"run.num_workers={nw}",
                                                    "optim.epochs=1", f"run.storage_path={root}/runs",
                                                    f"run.name=r{i}"])
        res = T.train(cfg)
        rec = res.history[0]
        print(json.dumps({"stage": "run", "index": i, "workers": nw, "s": round(time.perf_counter() - t, 1),
                          "epoch_train_s": round(rec["time_train_s"], 1), "epoch_eval_s": round(rec["time_eval_s"], 1)}),
              flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
