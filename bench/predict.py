"""Batch-prediction throughput: `psamf predict` (Ray Data, actor pool) against the model's bare forward.

    .venv/bin/python bench/predict.py --preset tiny --scale 1.0 --batch-size 64 --actors 1,2
    .venv/bin/python bench/predict.py --preset paper --scale 0.1 --batch-size 16 --actors 1,2

What it does: synthesises MOSI-shaped data (`psamf.synth`, MMSA layout) and prepares it (`psamf:tiny` tokens,
the preset's text length), saves a randomly initialised model of the preset as a checkpoint
(`psamf.checkpoint.save_checkpoint`: what is measured is the scoring pipeline, not what the model learnt), then
scores the test split

* **bare**: in this process, `load_model` once, the split's Parquet shards read with pyarrow, `PadCollate` per
  batch, forward under `torch.inference_mode` for each `--threads` count of torch threads (default: 1 and every
  core); the time covers collate + forward, after one warm-up batch; model loading is reported separately;
* **predict**: `psamf.predict.predict(...)` end to end on an already running embedded Ray (the call a user makes:
  checkpoint and shard checks, actor start-up, one model load per actor, Ray Data streaming, Parquet output), for
  each `--actors` value; an actor holds one CPU and runs torch on one thread, so 2 actors use the 2 cores.

Prints one JSON line per measurement (samples/s, seconds, rows) and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psamf  # noqa: E402,F401  (before ray: the embedded Ray's loopback setting)


def _machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "load_avg": os.getloadavg()}


def build(work: str, preset: str, scale: float, seed: int) -> tuple[str, str, int]:
    """(shards URI, checkpoint dir, test rows): synthetic data, prepared; a random model, saved."""
    import torch

    from psamf.checkpoint import save_checkpoint
    from psamf.config import Config
    from psamf.engine import Selector
    from psamf.model import build_model
    from psamf.prepare import prepare
    from psamf.synth import synthesize

    base = Config.from_preset(preset)
    pkl = synthesize("mosi", "mmsa", os.path.join(work, "synth"), seed=seed, scale=scale)["pickle"]
    shards = os.path.join(work, "shards")
    man = prepare({"format": "mmsa", "input": str(pkl), "dataset": "mosi"}, shards, tokenizer="psamf:tiny",
                  personality_tokenizer="psamf:tiny", max_text_len=base.data.max_text_len)
    cfg = base.override([f"data.uri={shards}", "data.tokenizer=psamf:tiny", "data.personality_tokenizer=psamf:tiny",
                         "model.text_model=null", "model.personality_model=null"])
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    ck = os.path.join(work, "checkpoint_epoch=001")
    save_checkpoint(ck, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scheduler=None,
                    selector=Selector("val_mae"), epoch=1, history=[], cfg=cfg)
    return shards, ck, int(man["counts"]["test"])


def bare_forward(shards: str, ck: str, batch_size: int) -> dict:
    """Collate + forward over the test split in this process (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from psamf.checkpoint import load_model
    from psamf.data import PadCollate
    from psamf.model import model_inputs
    from psamf.shards import read_manifest

    t0 = time.perf_counter()
    model, cfg = load_model(ck)
    load_s = time.perf_counter() - t0
    man = read_manifest(shards)
    table = pa.concat_tables([pq.read_table(os.path.join(shards, s["path"])) for s in man["shards"]
                              if s["split"] == "test"])
    collate = PadCollate(cfg.data, sample_ids=True)
    with torch.inference_mode():
        model(**model_inputs(collate(table.slice(0, batch_size))))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, table.num_rows, batch_size):
            model(**model_inputs(collate(table.slice(i, batch_size))))
        s = time.perf_counter() - t0
    return {"mode": "bare", "rows": table.num_rows, "seconds": round(s, 3),
            "samples_per_s": round(table.num_rows / s, 1), "model_load_s": round(load_s, 2)}


def via_predict(shards: str, ck: str, work: str, batch_size: int, actors: int) -> dict:
    from psamf.predict import predict

    rep = predict(ck, os.path.join(work, f"pred-{actors}.parquet"), shards=shards, split="test",
                  batch_size=batch_size, actors=actors, use_gpu=False)
    return {"mode": "psamf predict", "actors": actors, "rows": rep.rows, "seconds": round(rep.seconds, 3),
            "samples_per_s": round(rep.samples_per_s, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--scale", type=float, default=1.0, help="synthetic MOSI size (1.0: 686 test rows)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}",
                    help="comma-separated torch thread counts of the bare forward (default: 1 and every core)")
    args = ap.parse_args(argv)
    import torch

    from psamf import runtime

    with tempfile.TemporaryDirectory(prefix="psamf-bench-predict-") as work:
        shards, ck, n = build(work, args.preset, args.scale, args.seed)
        common = {"preset": args.preset, "batch_size": args.batch_size}
        print(json.dumps({"machine": _machine(), **common, "test_rows": n}), flush=True)
        for t in sorted({int(x) for x in args.threads.split(",")}):
            torch.set_num_threads(t)
            print(json.dumps({**common, "threads": t, **bare_forward(shards, ck, args.batch_size)}), flush=True)
        runtime.init_ray(max(int(a) for a in args.actors.split(",")))
        for a in (int(x) for x in args.actors.split(",")):
            print(json.dumps({**common, **via_predict(shards, ck, work, args.batch_size, a)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
