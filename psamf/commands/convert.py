"""`psamf convert`: a reference-implementation checkpoint (its `save_model` state dict) -> a psamf checkpoint.

    psamf convert REF_STATE_DICT OUT_DIR [--preset reference | --config FILE] [section.key=value ...]

Prints the load report (loaded / dropped with reasons / unknown / missing under reference names). OUT_DIR (local
or s3://) then works with `psamf evaluate OUT_DIR data.uri=...` like a run's checkpoint.
Exit status: 0 done, 2 bad input (unreadable file, keys that do not fit the configuration, OUT_DIR not empty).
"""

from __future__ import annotations

import argparse
import logging
import sys

from psamf.commands.common import add_config_arguments, load_config
from psamf.config import ConfigError

HELP = "turn a reference-implementation checkpoint (state dict) into a psamf checkpoint directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="REF_STATE_DICT",
                   help="the reference's checkpoint file (torch.save(model.state_dict())), local or s3://")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the psamf checkpoint directory to write (local or s3://); "
                                                      "must not exist yet or be empty")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="load what fits: keys that map to nothing are dropped and missing parameters keep their "
                        "initialisation (both reported) instead of being errors")
    p.add_argument("--s3-endpoint", default=None, help="custom S3 endpoint (else AWS_ENDPOINT_URL_S3)")
    add_config_arguments(p, default_preset="reference")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from psamf.convert import convert_reference_checkpoint

    try:
        cfg = load_config(args)
        report = convert_reference_checkpoint(args.source, args.out_dir, cfg, strict=args.strict,
                                              s3_endpoint=args.s3_endpoint)
    except ConfigError as e:
        print(f"psamf convert: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {args.out_dir} (model.pt, config.yaml, meta.json); evaluate it with "
          f"`psamf evaluate {args.out_dir} data.uri=...`")
    return 0
