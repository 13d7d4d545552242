"""Ray Jobs entrypoint: evaluate a checkpoint or a run's selected checkpoint (thin: parse, call psamf.evaluate).

    ray job submit ... -- python jobs/evaluate.py s3://BUCKET/psamf/runs/$RUN_ID --num-workers 2 --out eval.json

Same arguments as `psamf.evaluate.add_arguments`: a checkpoint directory or a run directory (its
validation-selected checkpoint), `--splits valid,test`, `--num-workers N` (0 = in the driver process), and
`section.key=value` overrides of the checkpoint's config (e.g. `data.uri=...`). Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psamf.cli import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_command("evaluate", argv, prog="jobs/evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
