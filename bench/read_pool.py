"""What Ray Data's Parquet footer-reader pool costs a psamf read, and what sizing it to the shard list saves.

Ray 2.60 lists the files of every `read_parquet` execution through RAY_DATA_PARQUET_FOOTER_NUM_ACTORS footer-reading
actors (default 32), each a new worker process, then kills them. `psamf.data.read_shards` asks for one actor per 10
shards instead (`psamf.data.footer_actors`). This bench prepares a synthetic MOSI-shaped shard set, starts one
embedded Ray, and times, alternately with Ray's default pool (the variable set to 32) and with psamf's sizing:

    build      build_datasets(all three splits), `data.materialize` on: one read per split
    epochs     two passes over train with `data.materialize` off (each pass re-reads, so lists again)

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/read_pool.py --scale 0.3 --rows-per-shard 40 --repeats 3

Prints one JSON line per timed call and a summary line (median seconds per pool). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psamf  # noqa: E402,F401  (before ray)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=0.3, help="synthetic MOSI scale")
    p.add_argument("--rows-per-shard", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the embedded Ray")
    args = p.parse_args()

    import ray

    from psamf.config import DataConfig
    from psamf.data import FOOTER_ACTORS_ENV, build_datasets, footer_actors, iter_batches
    from psamf.prepare import prepare
    from psamf.shards import read_manifest
    from psamf.synth import synthesize

    work = tempfile.mkdtemp(prefix="psamf-read-pool-")
    pkl = synthesize("mosi", "mmsa", f"{work}/synth", seed=0, scale=args.scale)["pickle"]
    out = f"{work}/shards"
    prepare({"format": "mmsa", "input": str(pkl), "dataset": "mosi"}, out, tokenizer="psamf:tiny",
            personality_tokenizer="psamf:tiny", max_text_len=32, rows_per_shard=args.rows_per_shard)
    man = read_manifest(out)
    files = {s: sum(sh["split"] == s for sh in man["shards"]) for s in ("train", "valid", "test")}
    print(json.dumps({"shards_per_split": files, "rows": man["counts"],
                      "psamf_pool": {s: footer_actors(n) for s, n in files.items()}}), flush=True)
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=args.num_cpus, include_dashboard=False,
             log_to_driver=False, object_store_memory=300 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = DataConfig(uri=out, tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny", max_text_len=32)
    lazy = DataConfig(**{**cfg.__dict__, "materialize": False})

    def build() -> None:
        build_datasets(cfg)

    def epochs() -> None:
        ds = build_datasets(lazy, splits=("train",))["train"]
        for epoch in range(2):
            for _ in iter_batches(ds, lazy, 16, epoch=epoch, train=True):
                pass

    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats):
        for pool in ("ray-default-32", "psamf-sized"):
            for name, fn in (("build", build), ("epochs", epochs)):
                if pool == "ray-default-32":
                    os.environ[FOOTER_ACTORS_ENV] = "32"
                else:
                    os.environ.pop(FOOTER_ACTORS_ENV, None)
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                os.environ.pop(FOOTER_ACTORS_ENV, None)
                times.setdefault((pool, name), []).append(dt)
                print(json.dumps({"repeat": rep, "pool": pool, "measure": name, "seconds": round(dt, 2)}), flush=True)
    print(json.dumps({"median_s": {f"{pool}/{name}": round(statistics.median(v), 2)
                                   for (pool, name), v in times.items()}}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
