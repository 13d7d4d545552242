"""`psamf config`: print a preset or a config file, with overrides applied, as resolved YAML."""

from __future__ import annotations

import argparse
import sys

from psamf.config import Config, ConfigError, ablate


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="preset name (default: tiny)")
    src.add_argument("--config", help="YAML config file")
    p.add_argument("--ablation", help="apply one ablation of the paper's table (no_personality, ...)")
    p.add_argument("overrides", nargs="*", help="section.key=value")


def load(args: argparse.Namespace) -> Config:
    cfg = Config.from_yaml(args.config) if getattr(args, "config", None) else Config.from_preset(args.preset)
    if getattr(args, "ablation", None):
        cfg = ablate(cfg, args.ablation)
    return cfg.override(args.overrides or [])


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load(args)
    except ConfigError as e:
        print(f"psamf config: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(cfg.to_yaml())
    return 0
