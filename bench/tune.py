"""Search throughput benchmark (a script, not a timed test): a 16-trial search of the `tiny` preset on this
machine's embedded local Ray, ASHA against no early stopping.

    OMP_NUM_THREADS=1 .venv/bin/python bench/tune.py                          # 16 trials, 3 epochs, both schedulers
    OMP_NUM_THREADS=1 .venv/bin/python bench/tune.py --trials 4 --epochs 2 --schedulers asha --out tune.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/tune.py --trials 8 --schedulers asha --workers-per-trial 1,0
        # a Ray Train worker group per trial against trials that train in their own process

Reports, per scheduler: trials per hour; the fraction of the machine kept busy (sum over trials of the trial's wall
time x the CPUs it holds, over elapsed time x the cluster's CPUs); epochs trained; and a trial's start-up overhead
(worker group start, dataset split: the first Tune iteration's time minus that epoch's own train + eval time)
against its training time. The load average before and after is printed: on a shared machine the figures move
with it. Data: synthetic MOSI-shaped shards (scale 0.15) prepared into a temporary directory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psamf import tune  # noqa: E402


def _space(shards: str, trials: int, epochs: int, scheduler: str, workers: int,
           concurrent: int | None, overrides: dict) -> tune.SearchSpace:
    return tune.SearchSpace.from_dict({
        "base": {"preset": "tiny", "overrides": {"data.uri": shards, "optim.epochs": epochs, **overrides}},
        "metric": "val_mae", "mode": "min", "num_samples": trials, "search": "optuna", "scheduler": scheduler,
        "grace_period": 1, "reduction_factor": 2, "workers_per_trial": workers, "seed": 0,
        "max_concurrent_trials": concurrent,
        "space": {"optim.lr_main": {"loguniform": [1e-3, 1e-2]}, "optim.lr_bert": {"loguniform": [1e-4, 3e-3]},
                  "loss.w_ccl": {"uniform": [0.0, 1.0]},
                  "model.sim_mode": {"choice": ["batch_dissimilarity", "per_sample_dissimilarity"]}},
    }, source="bench/tune.py")


def _measure(res: tune.SearchResult, storage: str, elapsed: float, cpus: float, per_trial_cpu: float) -> dict:
    """Busy fraction and start-up overhead from each trial's Tune result log and Train history."""
    import pandas as pd

    busy, startup, train, devices, mem = 0.0, [], [], [], []
    for r in res.rows:
        done = os.path.join(storage, res.name, "trials", r["trial_id"], "done.json")
        if os.path.exists(done):
            with open(done) as f:
                devices.append(json.load(f).get("device"))
        csv = [p for p in os.scandir(os.path.join(storage, res.name, r["trial_id"])) if p.name == "progress.csv"]
        if not csv:
            continue
        df = pd.read_csv(csv[0].path)
        busy += float(df["time_total_s"].max()) * per_trial_cpu
        first = df.iloc[0]
        own = float(first.get("time_train_s", 0)) + float(first.get("time_eval_s", 0))
        startup.append(float(first["time_this_iter_s"]) - own)
        train.append(float((df.get("time_train_s", 0) + df.get("time_eval_s", 0)).sum()))
        if "rss_gib" in df and "pid" in df:  # the trial's process after its last epoch (rank 0's)
            mem.append((float(df["timestamp"].iloc[0]), int(df["pid"].iloc[-1]), float(df["rss_gib"].iloc[-1])))
    n = len(res.rows)
    return {"trials": n, "elapsed_s": elapsed, "trials_per_hour": 3600 * n / elapsed,
            "busy_fraction": busy / (elapsed * cpus), "epochs": sum(r["epochs_run"] for r in res.rows),
            "startup_s_mean": sum(startup) / max(1, len(startup)),
            "train_eval_s_mean": sum(train) / max(1, len(train)), "devices": devices, "memory": _memory(mem),
            "statuses": {s: sum(r["status"] == s for r in res.rows) for s in tune.TRIAL_STATUSES}}


def _memory(mem: list[tuple[float, int, float]]) -> dict:
    """Per training process (pid), the resident set after each of its trials in start order: a reused trial actor
    (workers_per_trial 0) whose figure climbs from trial to trial holds on to something."""
    by_pid: dict[int, list[float]] = {}
    for _, pid, rss in sorted(mem):
        by_pid.setdefault(pid, []).append(round(rss, 3))
    longest = max(by_pid.values(), key=len, default=[])
    return {"processes": len(by_pid), "trials_per_process_max": len(longest),
            "rss_gib_by_process": {str(p): v for p, v in by_pid.items()},
            "rss_gib_first_last_of_busiest": [longest[0], longest[-1]] if longest else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--schedulers", default="asha,none")
    p.add_argument("--workers-per-trial", default="1",
                   help="comma list: 1 = a Ray Train worker group per trial, 0 = the trial trains in its own process")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at a time (default: what fits)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a base config override, e.g. run.use_gpu=true (repeatable)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    from psamf.prepare import prepare
    from psamf.runtime import init_ray
    from psamf.synth import synthesize

    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    tmp = tempfile.mkdtemp(prefix="psamf-bench-tune-")
    paths = synthesize("mosi", "mmsa", os.path.join(tmp, "synth"), seed=0, scale=0.15)
    shards = os.path.join(tmp, "shards")
    prepare({"format": "mmsa", "input": str(paths["pickle"]), "dataset": "mosi"}, shards, tokenizer="psamf:tiny",
            personality_tokenizer="psamf:tiny", max_text_len=32)
    init_ray(1)
    cpus = float(ray.cluster_resources().get("CPU", 0))
    out = {"load_before": os.getloadavg(), "cores": os.cpu_count(), "ray_cpus": cpus, "runs": {}}
    loads: list[float] = []  # the 1-minute load average every 30 s: what else the machine was doing
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(30):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample, daemon=True).start()
    for w in [int(x) for x in args.workers_per_trial.split(",") if x]:
        for sched in [s for s in args.schedulers.split(",") if s]:
            space = _space(shards, args.trials, args.epochs, sched, w, args.max_concurrent, overrides)
            storage = os.path.join(tmp, "runs")
            key = f"{sched} w{w}"
            t0 = time.perf_counter()
            res = tune.run_search(space, name=f"bench-{sched}-w{w}", storage_path=storage, out=io.StringIO())
            elapsed = time.perf_counter() - t0
            k = space.max_concurrent_trials or tune.max_concurrent_trials(space, ray.cluster_resources())
            held = max(1, w) * space.base.run.cpus_per_worker + (1 if w else 0)  # + the driver's CPU
            m = _measure(res, storage, elapsed, cpus, held)
            m.update(concurrent=k, workers_per_trial=w,
                     best=[(r["trial_id"], r.get("best_val_mae"), r["epochs_run"], r["status"]) for r in res.rows])
            out["runs"][key] = m
            print(f"{key}: {json.dumps(m)}", flush=True)
    out["load_after"] = os.getloadavg()
    stop.set()
    out["load_samples"] = loads
    if loads:
        print(f"1-minute load average during the runs: mean {sum(loads) / len(loads):.1f}, max {max(loads):.1f} "
              f"({len(loads)} samples)")
    print(f"load average before {out['load_before']}, after {out['load_after']}; {out['cores']} cores, "
          f"{cpus:g} Ray CPUs")
    print("| scheduler, workers per trial | trials | epochs | concurrent | elapsed s | trials/hour | busy | start-up s "
          "| train+eval s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, m in out["runs"].items():
        print(f"| {s} | {m['trials']} | {m['epochs']} | {m['concurrent']} | {m['elapsed_s']:.1f} | "
              f"{m['trials_per_hour']:.0f} | "
              f"{m['busy_fraction']:.2f} | {m['startup_s_mean']:.1f} | {m['train_eval_s_mean']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
