"""Ray Jobs entrypoint: train PSA-MF (thin: parse, validate, call psamf.train).

    ray job submit --address http://127.0.0.1:8265 --submission-id "$RUN_ID" --working-dir . \
      --runtime-env cluster/runtime_env.yaml \
      -- python jobs/train.py --config jobs/configs/mosi-reference.yaml --run-name "$RUN_ID" [--seeds 1111,1112] [k=v ...]

Same arguments as `psamf train` (see `psamf train --help`). Inside a Ray job `RAY_ADDRESS` is set, so the run
joins that cluster; run locally without it, an embedded local Ray starts (oversubscribed CPUs, on 127.0.0.1 only,
with a token of its own: docs/ray-operations.md §2-3). The run name is the resume key: resubmitting the same
`--run-name` resumes the run.
Exit status: 0 done, 2 bad configuration (nothing started), 1 training failed.
"""

from __future__ import annotations

import os
import sys

# the submitted working_dir (repository root) wins over any psamf installed in the image
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psamf.cli import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_command("train", argv, prog="jobs/train.py")


if __name__ == "__main__":
    sys.exit(main())
