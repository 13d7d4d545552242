"""Reproduce the checkpoint-restore race that failed CI, and show `psamf.checkpoint.open_checkpoint` avoids it.

Several processes (like DDP ranks on one node) open the same 160 MB checkpoint in S3 (a moto server on
127.0.0.1) at once, each several times, and read its tensor file. With Ray's `Checkpoint.as_directory()` they share
one download directory, and a process that arrives after a download finished downloads into it again while
another reads ("PytorchStreamReader failed reading file"). `open_checkpoint` gives each opening its own directory.
A script, not a test: the race is timing-dependent.

    .venv/bin/python bench/checkpoint_race.py --trials 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.conftest as fixtures  # noqa: E402  (sets the AWS test environment, picks a free port)
from tests.test_train import _open_checkpoint_repeatedly, _s3_checkpoint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--procs", type=int, default=3)
    p.add_argument("--openings", type=int, default=4)
    args = p.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=fixtures.S3_PORT, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=fixtures.S3_ENDPOINT, region_name="us-east-1").create_bucket(
            Bucket="psamf-race")
        ckpt, expected = _s3_checkpoint(Path(tempfile.mkdtemp()), "psamf-race", fixtures.S3_ENDPOINT, n=40_000_000)
        for use_ray in (True, False):
            failed = 0
            for _ in range(args.trials):
                try:
                    with mp.get_context("spawn").Pool(args.procs) as pool:
                        res = pool.starmap(_open_checkpoint_repeatedly,
                                           [(ckpt, args.openings, use_ray, r) for r in range(args.procs)])
                    failed += not all(s == expected for r in res for s in r)
                except Exception as e:  # noqa: BLE001 - the failure being counted
                    failed += 1
                    print(f"  {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}")
            name = "Ray Checkpoint.as_directory()" if use_ray else "psamf.checkpoint.open_checkpoint"
            print(f"{name}: {failed} of {args.trials} trials failed ({args.procs} processes x {args.openings} "
                  "openings of a 160 MB checkpoint)", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
