"""Ray Jobs entrypoint: score samples in bulk with a trained model (thin: parse, call psamf.predict).

    ray job submit ... -- python jobs/predict.py s3://BUCKET/psamf/runs/$RUN_ID \
        --shards s3://BUCKET/psamf/shards/new-clips --split test --actors 4 --out s3://BUCKET/psamf/predictions/$RUN_ID/

Same arguments as `psamf predict`: the model (a run name, a run directory or a checkpoint directory), one input
(`--shards URI [--split test]` or `--manifest CSV`), `--out FILE.parquet|DIR`, `--batch-size`, `--actors N`
(one GPU each when the cluster has GPUs). Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psamf.cli import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_command("predict", argv, prog="jobs/predict.py")


if __name__ == "__main__":
    sys.exit(main())
