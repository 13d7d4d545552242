"""Benchmark streaming prepared shards into one Ray Train worker: layouts x local/S3 x batching modes.

Three runs, each under ~5 minutes on the 2-core machine (shards from bench/prepare.py):

    B=/tmp/psamf-bench; S="--shards $B/mosei-ragged $B/mosei-fixed"
    OMP_NUM_THREADS=1 .venv/bin/python bench/stream.py $S --sources local --materialize off --step-batches 12
    OMP_NUM_THREADS=1 .venv/bin/python bench/stream.py $S --sources s3 --materialize off
    OMP_NUM_THREADS=1 .venv/bin/python bench/stream.py $S --sources local --materialize on \
        --modes shuffle grouped shuffle --object-store-mb 3072

For every (source, layout) a TorchTrainer with one 1-CPU worker makes one pass per mode over the first
train shards holding >= `--max-rows` rows (default 8192, 0 = all), timed inside the worker:

    plain     shard.iter_torch_batches(collate_fn=PadCollate())    Ray's own loop, no shuffling
    shuffle   psamf.data.iter_batches(train=True)                  per-epoch window permutation (the default)
    grouped   psamf.data.iter_batches(train=True, length_grouping) sorted windows, shuffled batch order

It reports samples/s over the whole pass (pipeline start-up included) and after the first batch, and
real vs padded tokens / frames. `--materialize on` lets build_datasets read train once into the object
store (timed as build_datasets_s) so passes iterate object-store blocks. `s3` serves the same shards
from a moto server inside this process: it exercises the S3 code path and HTTP transfer, not a real
object store's bandwidth.

`--step-batches N` also times, on the driver, forward+backward of the `tiny` PSA-MF model (dims set
to the data set's) and of a 4-layer, 256-wide BertModel alone, on N shuffled vs N length-grouped
batches: what grouping saves per step. Prints one JSON line per measurement. Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("plain", "shuffle", "grouped")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[object, dict]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    return server, env


def upload(local_dir: str, shards: list[str], bucket: str, prefix: str) -> str:
    """Copy the given shards and the manifest (last) of a prepared directory to moto S3."""
    import boto3
    import s3fs

    if not _bucket_exists(bucket):
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    for name in shards:
        fs.put_file(str(Path(local_dir) / name), f"{bucket}/{prefix}/{name}")
    fs.put_file(str(Path(local_dir) / "manifest.json"), f"{bucket}/{prefix}/manifest.json")  # last
    return f"s3://{bucket}/{prefix}"


def train_subset(man: dict, max_rows: int | None) -> dict:
    """The manifest restricted to the first train shards holding >= max_rows rows (all of train if None)."""
    keep, rows = [], 0
    for s in man["shards"]:
        if s["split"] == "train" and (not max_rows or rows < max_rows):
            keep.append(s)
            rows += s["rows"]
    return {**man, "shards": keep, "counts": {"train": rows}}


def _bucket_exists(bucket: str) -> bool:
    import boto3

    try:
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"]).head_bucket(Bucket=bucket)
        return True
    except Exception:  # noqa: BLE001
        return False


def worker_fn(config: dict) -> None:
    """One Train worker: a timed pass per mode over its train shard; results to a JSON file."""
    import ray.train

    from psamf.config import DataConfig
    from psamf.data import PadCollate, iter_batches, padding_stats

    cfg: DataConfig = config["cfg"]
    bs = config["batch_size"]
    shard = ray.train.get_dataset_shard("train")
    out = []
    for epoch, mode in enumerate(config["modes"]):
        t0 = time.perf_counter()
        t_first = None
        rows = 0
        pad: dict[str, int] = {}
        if mode == "plain":
            it = shard.iter_torch_batches(batch_size=bs, collate_fn=PadCollate(cfg), prefetch_batches=cfg.prefetch_batches)
        else:
            c = DataConfig(**{**cfg.__dict__, "length_grouping": mode == "grouped"})
            it = iter_batches(shard, c, bs, epoch=epoch, train=True, drop_last=False)
        pace = config.get("pace") or 0.0
        wait, t_ask = 0.0, time.perf_counter()
        for b in it:
            t_got = time.perf_counter()
            if t_first is None:
                t_first = t_got
            else:
                wait += t_got - t_ask  # the consumer waited for this batch (the first batch's wait: start-up)
            n = int(b["label"].shape[0])
            rows += n
            for k, v in padding_stats(b).items():
                pad[k] = pad.get(k, 0) + v
            if pace:  # a device step at `pace` samples/s: the host thread sleeps (GIL released) while it "runs"
                time.sleep(max(0.0, n / pace - (time.perf_counter() - t_got)))
            t_ask = time.perf_counter()
        t1 = time.perf_counter()
        rec = {"mode": mode, "rows": rows, "seconds": round(t1 - t0, 3),
               "first_batch_s": round(t_first - t0, 3),
               "samples_per_s": round(rows / (t1 - t0), 1),
               "steady_samples_per_s": round((rows - bs) / max(t1 - t_first, 1e-9), 1), **pad}
        if pace:  # data wait after the first batch, as a share of the pass after it (bench/train.py's definition)
            rec.update({"pace_samples_per_s": pace, "steady_wait_s": round(wait, 4),
                        "steady_wait_frac": round(wait / max(t1 - t_first, 1e-9), 4),
                        "wait_frac_incl_first": round((wait + t_first - t0) / (t1 - t0), 4)})
        out.append(rec)
    with open(config["result"], "w") as f:
        json.dump(out, f)


def run_trainer(data_cfg, batch_size: int, modes, man: dict, pace: float = 0.0) -> list[dict]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from psamf.data import build_datasets, split_config

    t = time.perf_counter()
    ds = build_datasets(data_cfg, splits=("train",), manifest=man)
    build_s = round(time.perf_counter() - t, 2)  # includes the one-time read when data_cfg.materialize
    result = Path(tempfile.mkdtemp(prefix="psamf-stream-")) / "r.json"
    with tempfile.TemporaryDirectory() as runs:
        TorchTrainer(
            worker_fn,
            train_loop_config={"cfg": data_cfg, "batch_size": batch_size, "modes": list(modes), "result": str(result),
                               "pace": pace},
            datasets=ds, dataset_config=split_config(),
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name=f"stream-{uuid.uuid4().hex[:8]}", storage_path=runs),
        ).fit()
    return [{"build_datasets_s": build_s, **r} for r in json.loads(result.read_text())]


def step_times(uri: str, n_batches: int, batch_size: int, man: dict) -> list[dict]:  # man: the train subset
    """Forward+backward of the tiny model on shuffled vs length-grouped batches (driver, CPU)."""
    import torch

    from psamf.config import Config, DataConfig
    from psamf.data import build_datasets, iter_batches, padding_stats
    from psamf.losses import compute_losses
    from psamf.model import build_model, model_inputs, param_groups

    cfg = Config.from_preset("tiny")
    cfg.model.audio_dim, cfg.model.visual_dim = man["feature_dims"]["audio"], man["feature_dims"]["visual"]
    cfg.model.max_position_embeddings = max(cfg.model.max_position_embeddings, man["max_lengths"]["text"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=man["tokenizers"]["text"]["vocab_size"], hidden_size=256,
                                num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                                max_position_embeddings=512), add_pooling_layer=False).train()
    opt = torch.optim.Adam(param_groups(model, cfg.optim))
    out = []
    for grouped in (False, True):
        dc = DataConfig(uri=uri, tokenizer=man["tokenizers"]["text"]["name"],
                        personality_tokenizer=man["tokenizers"]["personality"]["name"],
                        max_text_len=man["max_lengths"]["text"], length_grouping=grouped, materialize=False)
        ds = build_datasets(dc, splits=("train",), manifest=man)["train"]
        batches = []
        for b in iter_batches(ds, dc, batch_size, epoch=0, train=True):
            batches.append(b)
            if len(batches) == n_batches + 1:
                break
        times, pad = [], {}
        for i, b in enumerate(batches):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            o = model(**model_inputs(b))
            compute_losses(o, b["label"], cfg.loss, cfg.model)["total"].backward()
            opt.step()
            if i:  # first step = warm-up
                times.append(time.perf_counter() - t)
                for k, v in padding_stats(b).items():
                    pad[k] = pad.get(k, 0) + v
        times.sort()
        out.append({"measure": "tiny_model_step", "length_grouping": grouped, "batches": len(times),
                    "batch_size": batch_size, "median_step_s": round(times[len(times) // 2], 4),
                    "mean_step_s": round(sum(times) / len(times), 4), **pad})
        # the text part alone (the sentiment BERT dominates a paper-size step): a 4-layer, 256-wide BertModel
        bert_times = []
        for i, b in enumerate(batches):
            t = time.perf_counter()
            h = bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     token_type_ids=b["token_type_ids"]).last_hidden_state
            h[:, 0].sum().backward()
            if i:
                bert_times.append(time.perf_counter() - t)
        bert_times.sort()
        out.append({"measure": "bert_4x256_step", "length_grouping": grouped, "batches": len(bert_times),
                    "batch_size": batch_size, "median_step_s": round(bert_times[len(bert_times) // 2], 4),
                    "mean_step_s": round(sum(bert_times) / len(bert_times), 4)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", nargs="+", required=True, help="prepared shard directories (bench/prepare.py)")
    ap.add_argument("--sources", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-rows", type=int, default=8192,
                    help="stream the first train shards holding >= this many rows (0 = all of train)")
    ap.add_argument("--materialize", choices=["off", "on"], default="off",
                    help="off: every pass streams Parquet; on: build_datasets materializes train once")
    ap.add_argument("--step-batches", type=int, default=0)
    ap.add_argument("--pace", type=float, default=0.0,
                    help="consume at most this many samples/s (a simulated device step: the worker sleeps n/pace "
                         "per batch) and report the data wait; 0 = consume as fast as the pipeline delivers")
    ap.add_argument("--object-store-mb", type=int, default=1024)
    args = ap.parse_args(argv)

    server = None
    env = {}
    if "s3" in args.sources:
        server, env = start_moto()
    import ray

    from psamf.config import DataConfig
    from psamf.data import read_manifest

    ray.init(address="local", num_cpus=4, object_store_memory=args.object_store_mb * 2**20, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {**env, "RAY_AUTH_MODE": "disabled",
                                                            "TOKENIZERS_PARALLELISM": "false"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray").setLevel(logging.WARNING)
    print(json.dumps({"machine": f"{os.cpu_count()}-core CPU", "load_avg": os.getloadavg(), "batch_size": args.batch_size,
                      "max_rows": args.max_rows}), flush=True)
    try:
        for local in args.shards:
            man = train_subset(read_manifest(local), args.max_rows)
            for source in args.sources:
                uri = local
                if source == "s3":
                    t = time.perf_counter()
                    uri = upload(local, [s["path"] for s in man["shards"]], "psamf-bench", Path(local).name)
                    print(json.dumps({"upload_s": round(time.perf_counter() - t, 1), "uri": uri}), flush=True)
                cfg = DataConfig(uri=uri, tokenizer=man["tokenizers"]["text"]["name"],
                                 personality_tokenizer=man["tokenizers"]["personality"]["name"],
                                 max_text_len=man["max_lengths"]["text"], materialize=args.materialize == "on")
                disk_mb = round(sum(s["bytes"] for s in man["shards"]) / 2**20, 1)
                for r in run_trainer(cfg, args.batch_size, args.modes, man, args.pace):
                    print(json.dumps({"source": source, "layout": man["layout"], "materialize": args.materialize,
                                      "shards": len(man["shards"]),
                                      "disk_mb": disk_mb, "row_group_rows": man.get("row_group_rows"), **r}),
                          flush=True)
            if args.step_batches and local == args.shards[0]:  # layout-independent: measure once
                for r in step_times(local, args.step_batches, args.batch_size, man):
                    print(json.dumps({"layout": man["layout"], **r}), flush=True)
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
