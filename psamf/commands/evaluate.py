"""`psamf evaluate` and `jobs/evaluate.py`: evaluate a run's selected checkpoint (or any checkpoint) on valid/test.

With `--out m.json`, the per-split plots (`<split>_confusion_7class.png` / `.csv`, `<split>_scatter.png`) are
written next to it; `--plots-dir` puts them elsewhere (local or s3://).

Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from psamf.config import ConfigError
from psamf.evaluate import evaluate_checkpoint, write_eval_plots
from psamf.results import metrics_table
from psamf.storage import atomic_open, json_safe

HELP = "evaluate a run's selected checkpoint (or any checkpoint) on valid/test"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory or run directory (local or s3://); a run directory "
                                      "means its validation-selected checkpoint")
    p.add_argument("--splits", default="valid,test", help="comma-separated splits (default: valid,test)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="0 = in this process (the default); N = N Ray Train workers (predictions gathered from "
                        "every rank)")
    p.add_argument("--s3-endpoint", default=None, help="custom S3 endpoint (else AWS_ENDPOINT_URL_S3)")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")
    p.add_argument("--out", default=None, help="write the metrics as JSON here (local path, replaced if it exists: "
                                               "an evaluation is recomputed the same); the plots go next to it "
                                               "unless --plots-dir says otherwise")
    p.add_argument("--plots-dir", default=None,
                   help="write <split>_confusion_7class.png/.csv and <split>_scatter.png here (local or s3://; "
                        "default: the directory of --out; neither given: no plots)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="data.*, run.* and optim.amp (section.key=value) applied to the checkpoint's config (e.g. "
                        "data.uri=... optim.amp=off)")


def _check_targets(out: str | None, plots: str | None) -> None:
    """Before any work: --out must not be a directory, the plots directory must not be a file."""
    if out and os.path.isdir(out):
        raise ConfigError(f"--out {out}: is a directory; give the path of the metrics JSON file")
    if plots and "://" not in plots and os.path.exists(plots) and not os.path.isdir(plots):
        raise ConfigError(f"--plots-dir {plots}: is a file, not a directory")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    plots = args.plots_dir or (os.path.dirname(os.path.abspath(args.out)) if args.out else None)
    try:
        _check_targets(args.out, plots)
        res = evaluate_checkpoint(args.checkpoint, splits=[s for s in args.splits.split(",") if s],
                                  num_workers=args.num_workers, overrides=args.overrides or [],
                                  s3_endpoint=args.s3_endpoint, batch_size=args.batch_size)
    except ConfigError as e:
        print(f"psamf evaluate: {e}", file=sys.stderr)
        return 2
    print(metrics_table({s: r.metrics for s, r in res.items()}, splits=list(res)))
    if args.out:
        with atomic_open(args.out, "w") as f:
            json.dump(json_safe({s: r.metrics for s, r in res.items()}), f, indent=2)
        print(f"wrote {args.out}")
    if plots:
        try:
            for path in write_eval_plots(plots, res, s3_endpoint=args.s3_endpoint):
                print(f"wrote {path}")
        except ConfigError as e:
            print(f"psamf evaluate: {e}", file=sys.stderr)
            return 2
    return 0
