"""Ray Jobs entrypoint: pretrain a personality encoder on a Big Five corpus (thin: parse, call psamf.pretrain).

    ray job submit ... -- python jobs/personality.py pretrain --data s3://BUCKET/bigfive.parquet \
        --model bert-base-uncased --out /models/personality-bert --num-workers 2 --storage-path s3://BUCKET/runs

Same arguments as `psamf personality`. Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psamf.cli import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_command("personality", argv, prog="jobs/personality.py")


if __name__ == "__main__":
    sys.exit(main())
