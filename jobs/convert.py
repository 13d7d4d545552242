"""Ray Jobs entrypoint: convert a reference-implementation checkpoint into a psamf checkpoint directory.

    ray job submit ... -- python jobs/convert.py s3://BUCKET/ref/psamf_ref.pt s3://BUCKET/psamf/converted/mosi

Same arguments as `psamf convert`: the reference's state-dict file, the checkpoint directory to write (local or
s3://), `--preset`/`--config`, `section.key=value` overrides, `--no-strict`. Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psamf.cli import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_command("convert", argv, prog="jobs/convert.py")


if __name__ == "__main__":
    sys.exit(main())
