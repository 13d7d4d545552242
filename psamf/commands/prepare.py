"""`psamf prepare`: turn MMSA / MulT / custom corpora into Parquet shards plus manifest.json (`psamf.prepare`).

Exit status: 0 done, 2 bad input (the message names the file and field).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from psamf import sources
from psamf.datasets import NAMES as DATASETS
from psamf.prepare import (DEFAULT_LAYOUT, DEFAULT_ROW_GROUP_MB, DEFAULT_TARGET_SHARD_MB, LAYOUTS, check_output,
                           prepare)
from psamf.shards import MANIFEST_NAME
from psamf.sources import SOURCE_FORMATS as FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", required=True, choices=FORMATS, help="input format")
    p.add_argument("--input", required=True, help="MMSA/MulT pickle, or the custom manifest")
    p.add_argument("--labels", default=None, help="label CSV (MulT format only)")
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help="which corpus the input holds (label range, metrics and the manifest's identity)")
    p.add_argument("--out", required=True, help="output directory or URI (local, s3://, gs://)")
    p.add_argument("--tokenizer", default="bert-base-uncased",
                   help="sentiment tokenizer: HF name or path, or psamf:tiny (default bert-base-uncased)")
    p.add_argument("--personality-tokenizer", default=None, help="default: --tokenizer")
    p.add_argument("--max-text-len", type=int, default=50,
                   help="tokens per transcript, [CLS] and [SEP] included (default 50, the paper's); `psamf train` "
                        "takes this length from the manifest")
    p.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                   help=f"how feature sequences are stored in the shards (default {DEFAULT_LAYOUT})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rows-per-shard", type=int, default=None,
                   help="rows per Parquet shard (default: sized by --target-shard-mb)")
    g.add_argument("--target-shard-mb", type=float, default=DEFAULT_TARGET_SHARD_MB,
                   help=f"approximate size of one Parquet shard in MB (default {DEFAULT_TARGET_SHARD_MB:g})")
    p.add_argument("--row-group-mb", type=float, default=DEFAULT_ROW_GROUP_MB,
                   help=f"approximate size of one Parquet row group in MB (default {DEFAULT_ROW_GROUP_MB:g})")
    p.add_argument("--personality-cls", action="store_true",
                   help="precompute the frozen personality encoder's CLS (a Ray Data pass); without "
                        "--personality-model the encoder is --preset's seeded random-init BERT (for plumbing tests)")
    p.add_argument("--preset", default="paper",
                   help="config preset giving the random-init personality encoder's geometry (default paper: 12 "
                        "layers, width 768; use the preset you train with)")
    p.add_argument("--personality-model", default=None,
                   help="HF name/path of the personality BERT (implies --personality-cls)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL_S3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train row order (default 0)")
    p.add_argument("--allow-nonempty", action="store_true",
                   help="write into a directory that holds other files (not a psamf data set); they are left "
                        "alone. prepare only ever deletes the shards a previous prepare recorded in manifest.json")
    p.add_argument("--no-progress", action="store_true", help="do not print progress on stderr")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    personality_model = None
    if args.personality_cls or args.personality_model:
        from psamf.config import Config

        mc = Config.from_preset(args.preset).model
        if args.personality_model:
            mc.personality_model = args.personality_model
        else:
            logging.getLogger("psamf.prepare").warning(
                "--personality-cls without --personality-model: CLS_p from the seeded random-init personality BERT "
                "of preset %r (%d layers, width %d), which knows nothing of personality; a model trained on it "
                "needs model.hidden_size=%d", args.preset, mc.personality_layers, mc.hidden_size, mc.hidden_size)
        personality_model = mc
    try:
        check_output(args.out, s3_endpoint=args.s3_endpoint, allow_nonempty=args.allow_nonempty)
        with warnings.catch_warnings():  # a checksum mismatch is logged already: not a second time as a warning
            warnings.simplefilter("ignore", sources.ChecksumMismatchWarning)
            raw = sources.read_source(args.format, args.input, label_csv=args.labels, name=args.dataset)
        man = prepare(raw, args.out, tokenizer=args.tokenizer,
                      personality_tokenizer=args.personality_tokenizer or args.tokenizer,
                      max_text_len=args.max_text_len, personality_model=personality_model, layout=args.layout,
                      rows_per_shard=args.rows_per_shard, target_shard_mb=args.target_shard_mb,
                      row_group_mb=args.row_group_mb,
                      s3_endpoint=args.s3_endpoint, shuffle_seed=args.seed,
                      allow_nonempty=args.allow_nonempty, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"psamf prepare: error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in man["counts"].items())
    print(f"wrote {len(man['shards'])} shards ({counts}; layout {man['layout']}) and {MANIFEST_NAME} to {args.out}")
    return 0
