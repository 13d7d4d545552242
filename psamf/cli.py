"""psamf: train and tune PSA-MF multimodal sentiment models on Ray (laptop or cluster).

Each subcommand lives in `psamf.commands.<name>` with `add_arguments(parser)` and `run(args) -> int`; only the
chosen subcommand's module is imported (so `psamf config` does not pay for importing Ray and torch), and
`psamf --help` lists the subcommands from the table below without importing any of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help; the module is psamf.commands.<name>
COMMANDS: dict[str, str] = {
    "demo": "run the whole pipeline on the embedded local Ray with synthetic data and the tiny model",
    "config": "print a preset (or a config file with overrides) as resolved YAML",
    "synth": "write a seeded synthetic MOSI/MOSEI/SIMS-shaped data set (MMSA, MulT + label CSV, or custom manifest)",
    "prepare": "turn MMSA / MulT / custom corpora into Parquet shards plus manifest.json",
    "train": "train PSA-MF with Ray Train (embedded local Ray, or the cluster in RAY_ADDRESS)",
    "evaluate": "evaluate a run's selected checkpoint (or any checkpoint) on valid/test",
    "convert": "turn a reference-implementation checkpoint (state dict) into a psamf checkpoint directory",
    "tune": "search hyperparameters with Ray Tune (search space as YAML; resumable; TensorBoard HParams)",
    "study": "the paper's ablation and layer studies as seed grids: mean ± std tables with paired tests",
    "personality": "pretrain a personality encoder on Big Five data (Ray Train) for prepare --personality-model",
    "predict": "score a prepared shard set or a custom manifest with a trained model (Ray Data batch inference)",
}

DESCRIPTION = ("Train and tune PSA-MF (Personality-Sentiment Aligned Multi-Level Fusion) multimodal sentiment "
               "models on Ray: an embedded local Ray on a laptop, any Ray cluster through RAY_ADDRESS or "
               "`ray job submit`. Start with `psamf demo`.")


def command_module(name: str):
    return importlib.import_module(f"psamf.commands.{name}")


def build_parser(command: str | None = None, prog: str = "psamf") -> argparse.ArgumentParser:
    """The parser; with `command`, only that subcommand's arguments are built (and its module imported)."""
    from psamf import __version__

    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"psamf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_ in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            command_module(name).add_arguments(p)
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


def command_parser(name: str, *, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one subcommand on its own (what `jobs/<name>.py` accepts)."""
    parser = argparse.ArgumentParser(prog=prog or f"psamf {name}", description=COMMANDS.get(name))
    command_module(name).add_arguments(parser)
    return parser


def run_command(name: str, argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Parse `argv` as the arguments of one subcommand and run it (the `jobs/*.py` entry points call this)."""
    args = parse_args(command_parser(name, prog=prog), argv)
    return _run(name, args)


def _run(name: str, args: argparse.Namespace) -> int:
    """Run one command; an object store that cannot be reached ends it with one line and status 2, not a
    botocore traceback (every command reads or writes storage before it starts work); Ctrl+C with one line and
    status 130."""
    from psamf.runtime import Interrupted
    from psamf.storage import unreachable_store

    try:
        return int(command_module(name).run(args) or 0)
    except Interrupted as e:
        print(f"psamf {name}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"psamf {name}: interrupted (Ctrl+C). Files are written whole or not at all (a temporary name, then "
              "a rename; manifests and metrics.json last), so what is there is complete; run the command again",
              file=sys.stderr)
        return 130
    except Exception as e:
        msg = unreachable_store(e)
        if msg is None:
            raise
        print(f"psamf {name}: error: {msg}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parse_args(parser, argv)
    return _run(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
