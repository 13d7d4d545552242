"""`psamf synth`: write a seeded synthetic MOSI/MOSEI/SIMS-shaped data set, or a Big Five corpus (`psamf.synth`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from psamf.synth import (BIGFIVE_FORMATS, BIGFIVE_SPLIT_SIZES, FORMATS, KINDS, SIGNALS, SPLITS, scaled_size,
                         synthesize, synthesize_bigfive)

BIGFIVE = "bigfive"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=[*sorted(KINDS), BIGFIVE], default="mosi",
                        help="which release to imitate; bigfive = a Big Five personality corpus (text + five "
                             "trait scores) from the same speakers' personality model (default mosi)")
    parser.add_argument("--format", dest="fmt", choices=[*FORMATS, *BIGFIVE_FORMATS], default=None,
                        help=f"output format: {', '.join(FORMATS)} (default mmsa) for the sentiment kinds, "
                             f"{' or '.join(BIGFIVE_FORMATS)} (default csv) for bigfive")
    parser.add_argument("--out", required=True,
                        help="output directory (created if missing; files of the same names are replaced: a seed "
                             "always writes the same bytes)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed => identical bytes; default 0)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="split sizes relative to the canonical ones (docs/data-formats.md); default 1.0")
    parser.add_argument("--full-text-features", action="store_true",
                        help="write the unused text-feature arrays at their real width (768 BERT / 300 GloVe) "
                             "instead of width 1")
    parser.add_argument("--personality-signal", choices=list(SIGNALS), default="weak",
                        help="how strongly personality is planted, the same for the sentiment kinds and bigfive: "
                             "weak (default, ~2.5 common style words per transcript) or strong (~8 words from a "
                             "large rare style vocabulary, personality weighs more in the label), for showing what "
                             "a pretrained personality encoder adds")
    parser.add_argument("--no-progress", action="store_true", help="do not print progress on stderr")


def _synthesize(args: argparse.Namespace) -> tuple[str, dict, Any]:
    """(format, written paths, canonical split sizes); ValueError for a bad format or value."""
    if args.kind == BIGFIVE:
        fmt = args.fmt or BIGFIVE_FORMATS[0]
        if fmt not in BIGFIVE_FORMATS:
            raise ValueError(f"--kind bigfive writes --format {' or '.join(BIGFIVE_FORMATS)}, not {fmt}")
        return fmt, synthesize_bigfive(args.out, fmt, seed=args.seed, scale=args.scale,
                                       personality_signal=args.personality_signal), BIGFIVE_SPLIT_SIZES
    fmt = args.fmt or FORMATS[0]
    if fmt not in FORMATS:
        raise ValueError(f"--kind {args.kind} writes --format {', '.join(FORMATS)}, not {fmt}")
    return fmt, synthesize(args.kind, fmt, args.out, seed=args.seed, scale=args.scale,
                           full_text_features=args.full_text_features, progress=not args.no_progress,
                           personality_signal=args.personality_signal), KINDS[args.kind].split_sizes


def run(args: argparse.Namespace) -> int:
    try:
        fmt, paths, sizes = _synthesize(args)
    except ValueError as e:
        print(f"psamf synth: error: {e}", file=sys.stderr)
        return 2
    corpus_sizes = {s: scaled_size(n, args.scale, 2) for s, n in zip(SPLITS, sizes)}
    print(f"psamf synth: {args.kind} ({fmt}, seed {args.seed}, scale {args.scale}, personality signal "
          f"{args.personality_signal}) sizes {corpus_sizes}")
    for key, path in paths.items():
        print(f"  {key}: {path}")
    return 0
