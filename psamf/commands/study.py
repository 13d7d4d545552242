"""`psamf study ablations|layers`: the paper's studies as Tune grids over seeds (psamf.study)."""

from __future__ import annotations

import argparse
import logging
import sys

from psamf import study
from psamf.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=sorted(study.STUDIES), help="ablations: the full model and the five ablations; "
                   "layers: alignment at every text hidden-state index")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="start from a preset (default: tiny unless --config)")
    src.add_argument("--config", help="YAML config file")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, paired across rows (default 1,2,3)")
    p.add_argument("--name", help="study name: runs <name>-<row>-seed<k>, table in <storage>/<name>/study.md "
                                  "(default: the kind)")
    p.add_argument("--resume", action="store_true", help="restore the study's Tune grid: finished trials are kept")
    p.add_argument("overrides", nargs="*", help="section.key=value (e.g. optim.epochs=10 run.storage_path=runs)")


def _config(args: argparse.Namespace) -> study.Config:
    from psamf.config import Config

    cfg = Config.from_yaml(args.config) if args.config else Config.from_preset(args.preset or "tiny")
    return cfg.override(list(args.overrides or []))


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    return seeds


def run(args: argparse.Namespace) -> int:
    """Exit status 0 done, 2 bad configuration (no trial started), 1 a run failed."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg, seeds = _config(args), _seeds(args.seeds)
        res = study.STUDIES[args.kind](cfg, seeds, name=args.name or args.kind, resume=args.resume)
    except ConfigError as e:
        print(f"psamf study: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"psamf study: {e}", file=sys.stderr)
        return 1
    print(f"table: {res.paths['table']}\nsummary: {res.paths['summary']}")
    return 0
