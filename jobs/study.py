"""Ray Jobs entrypoint: `psamf study` under `ray job submit` (thin: the same arguments, see `psamf study --help`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
      -- python jobs/study.py ...

Exit status: 0 done, 2 bad input (nothing started), 1 failed.
"""

from __future__ import annotations

import os
import sys

# the submitted working_dir (repository root) wins over any psamf installed in the image
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psamf.cli import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_command("study", argv, prog="jobs/study.py")


if __name__ == "__main__":
    sys.exit(main())
