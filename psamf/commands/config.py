"""`psamf config`: print a preset or a config file, with ablations and overrides applied, as resolved YAML."""

from __future__ import annotations

import argparse
import sys

from psamf.commands.common import add_config_arguments, load_config
from psamf.config import ConfigError

HELP = "print a preset (or a config file with overrides) as resolved YAML"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args)
    except ConfigError as e:
        print(f"psamf config: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(cfg.to_yaml())
    return 0
