"""`psamf synth`: write a seeded synthetic MOSI/MOSEI/SIMS-shaped data set (`psamf.synth`)."""

from __future__ import annotations

import argparse

from psamf.synth import FORMATS, KINDS, SPLITS, synthesize, scaled_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=sorted(KINDS), default="mosi", help="which release to imitate")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="mmsa", help="output format")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed => identical bytes)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="split sizes relative to the canonical ones (docs/data-formats.md); default 1.0")
    parser.add_argument("--full-text-features", action="store_true",
                        help="write the unused text-feature arrays at their real width (768 BERT / 300 GloVe) "
                             "instead of width 1")
    parser.add_argument("--no-progress", action="store_true", help="do not print progress on stderr")


def run(args: argparse.Namespace) -> int:
    paths = synthesize(args.kind, args.fmt, args.out, seed=args.seed, scale=args.scale,
                       full_text_features=args.full_text_features, progress=not args.no_progress)
    corpus_sizes = {s: scaled_size(n, args.scale, 2) for s, n in zip(SPLITS, KINDS[args.kind].split_sizes)}
    print(f"psamf synth: {args.kind} ({args.fmt}, seed {args.seed}, scale {args.scale}) sizes {corpus_sizes}")
    for key, path in paths.items():
        print(f"  {key}: {path}")
    return 0
