"""`psamf predict` and `jobs/predict.py`: score samples in bulk with a trained model (`psamf.predict`).

Exit status: 0 done, 2 bad input (the message names the field and the file).
"""

from __future__ import annotations

import argparse
import logging
import sys

from psamf.config import ConfigError

HELP = "score a prepared shard set or a custom manifest with a trained model (Ray Data batch inference)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="the model: a run name (under --storage-path), a run directory (its "
                                  "validation-selected checkpoint) or a checkpoint directory; local or s3://")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", default=None, help="a prepared shard set (psamf prepare), local or s3://")
    src.add_argument("--manifest", default=None,
                     help="a custom manifest (CSV or Parquet: id, text, audio_path, visual_path; label optional), "
                          "validated and tokenised as `psamf prepare` does")
    p.add_argument("--split", default=None, help="which split of --shards to score (default: test; a --manifest "
                                                 "is scored whole)")
    p.add_argument("--out", required=True,
                   help="OUT.parquet (one file, input order) or a new or empty directory (Ray Data write_parquet, "
                        "then _predictions.json); local or s3://")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out FILE.parquet (a directory must always be new or empty)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per inference batch (default 64)")
    p.add_argument("--actors", type=int, default=1, help="inference actors, each loading the model once (default 1)")
    p.add_argument("--cpus-per-actor", type=float, default=1,
                   help="CPUs each actor holds; torch runs that many threads in it (default 1)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="use_gpu", action="store_const", const=True, default=None,
                     help="one GPU per actor (default: when the Ray cluster has GPUs)")
    gpu.add_argument("--cpu", dest="use_gpu", action="store_const", const=False, help="never use a GPU")
    p.add_argument("--storage-path", default=None, help="where run names are looked up (default: runs)")
    p.add_argument("--s3-endpoint", default=None, help="custom S3 endpoint (else AWS_ENDPOINT_URL_S3)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="section.key=value applied to the checkpoint's config (data and run keys only; the model's "
                        "shape is the checkpoint's)")


def run(args: argparse.Namespace) -> int:
    from psamf.predict import predict

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        rep = predict(args.source, args.out, shards=args.shards, split=args.split, manifest=args.manifest,
                      batch_size=args.batch_size, actors=args.actors, use_gpu=args.use_gpu,
                      cpus_per_actor=args.cpus_per_actor,
                      s3_endpoint=args.s3_endpoint, storage_path=args.storage_path, overrides=args.overrides or [],
                      overwrite=args.overwrite)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"psamf predict: error: {e}", file=sys.stderr)
        return 2
    print(f"psamf predict: {rep.rows} samples from {rep.input}\n  checkpoint: {rep.checkpoint}\n  wrote: {rep.out} "
          f"({len(rep.files)} file(s); {rep.seconds:.1f} s, {rep.samples_per_s:.1f} samples/s)")
    return 0
