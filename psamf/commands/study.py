"""`psamf study ablations|layers`: the paper's studies as Tune grids over seeds (psamf.study)."""

from __future__ import annotations

import argparse
import logging
import sys

from psamf import study
from psamf.commands.common import add_config_arguments, load_config, parse_seeds
from psamf.config import ABLATIONS, ConfigError


HELP = "the paper's ablation and layer studies as seed grids: mean ± std tables with paired tests"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=sorted(study.STUDIES), help="ablations: the full model and the five ablations; "
                   "layers: alignment at every text hidden-state index")
    add_config_arguments(p)
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, paired across rows (default 1,2,3)")
    p.add_argument("--name", help="study name: runs <name>-<row>-seed<k>, table in <storage>/<name>/study.md "
                                  "(default: the kind)")
    p.add_argument("--rows", help="comma-separated rows to run, the reference row among them (ablations: full, "
                                  f"{', '.join(ABLATIONS)}; layers: align<i>); default: every row. "
                                  "E.g. --rows full,no_personality")
    p.add_argument("--resume", action="store_true", help="restore the study's Tune grid: finished trials are kept")


def run(args: argparse.Namespace) -> int:
    """Exit status 0 done, 2 bad configuration (no trial started), 1 a run failed (the table of the others is
    written), 130 interrupted (nothing summarised; --resume continues)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.kind == "ablations" and args.ablation:
            raise ConfigError(f"--ablation {' --ablation '.join(args.ablation)}: psamf study ablations runs every "
                              "ablation as its own row against the full model; an --ablation would turn the "
                              "reference row 'full' into an ablation too. Pick rows with --rows")
        cfg, seeds = load_config(args), parse_seeds(args.seeds)
        only = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
        res = study.STUDIES[args.kind](cfg, seeds, name=args.name or args.kind, resume=args.resume, only=only)
    except ConfigError as e:
        print(f"psamf study: {e}", file=sys.stderr)
        return 2
    except study.GridInterrupted as e:
        print(f"psamf study: {e}. Continue it: the same command with --resume", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"psamf study: {e}", file=sys.stderr)
        return 1
    print(f"table: {res.paths['table']}\nsummary: {res.paths['summary']}")
    return 0
