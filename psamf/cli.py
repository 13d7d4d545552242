"""The `psamf` command line. Each subcommand lives in its own module, imported only when used.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("psamf.demo", "run the whole pipeline on the embedded local Ray with synthetic data and the tiny model"),
    "config": ("psamf.config_cli", "print a preset (or a config file with overrides) as resolved YAML"),
    "synth": ("psamf.synth", "write a seeded synthetic MOSI/MOSEI/SIMS-shaped data set (MMSA, MulT + label CSV, or custom manifest)"),
    "prepare": ("psamf.prepare", "turn MMSA / MulT / custom corpora into Parquet shards plus manifest.json"),
    "train": ("psamf.train", "train PSA-MF with Ray Train (embedded local Ray, or the cluster in RAY_ADDRESS)"),
    "evaluate": ("psamf.evaluate", "evaluate a run's selected checkpoint (or any checkpoint) on valid/test"),
    "study": ("psamf.commands.study", "the paper's ablation and layer tables: a Tune grid over seeds, mean ± std, paired tests"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psamf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:  # a subcommand whose module is not built yet
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args`, except that `section.key=value` overrides may also come after options
    (`psamf evaluate RUN --out m.json data.uri=...`): argparse fills a positional list only once, before the
    first option, when the other positionals are already taken. Anything else left over is an error."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if getattr(args, "_missing", False):
        parser.error(f"subcommand {args.command!r} is not available in this build")
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
