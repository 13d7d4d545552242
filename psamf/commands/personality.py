"""`psamf personality pretrain` and `jobs/personality.py`: fine-tune a BERT-family personality encoder on a Big Five
corpus (Ray Train) and export it as a Hugging Face directory for `model.personality_model` /
`psamf prepare --personality-model`.

Exit status: 0 done, 2 bad input (the message names the file and field).
"""

from __future__ import annotations

import argparse
import logging
import sys

HELP = "fine-tune a personality encoder on Big Five data (Ray Train) and export it for prepare/train"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from psamf.personality import TINY_CONFIG
    from psamf.pretrain import PretrainConfig

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True, help="what to do: pretrain")
    q = sub.add_parser("pretrain", help="multi-output regression of the five traits on the CLS, then export",
                       description=HELP)
    q.add_argument("--data", required=True, help="Big Five corpus: CSV/TSV/Parquet with text, openness, "
                   "conscientiousness, extraversion, agreeableness, neuroticism in [0, 1]; optional id, speaker, "
                   "split (local or s3://)")
    q.add_argument("--model", required=True, help=f"BERT-family start point: hub name, local directory, or "
                                                   f"{TINY_CONFIG} (the tiny preset's random personality BERT)")
    q.add_argument("--out", required=True, help="local directory for the exported encoder + tokenizer + "
                                                "pretrain_metrics.json")
    d = PretrainConfig.__dataclass_fields__  # the defaults shown are the ones the run uses
    q.add_argument("--tokenizer", default=None, help="default: the model's own (psamf:tiny for the tiny config)")
    q.add_argument("--name", default=d["name"].default, help="run name (re-run the same name to resume; default "
                                                             "%(default)s)")
    q.add_argument("--storage-path", default=d["storage_path"].default,
                   help="where the run directory with checkpoints lives, local or s3:// (default %(default)s)")
    q.add_argument("--s3-endpoint", default=None, help="custom S3 endpoint (else AWS_ENDPOINT_URL_S3)")
    q.add_argument("--epochs", type=int, default=d["epochs"].default, help="epochs (default %(default)s)")
    q.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                   help="rows per batch on each worker (default %(default)s)")
    q.add_argument("--lr", type=float, default=d["lr"].default, help="encoder learning rate (default %(default)s)")
    q.add_argument("--head-lr", type=float, default=d["head_lr"].default,
                   help="regression head learning rate (default %(default)s)")
    q.add_argument("--weight-decay", type=float, default=d["weight_decay"].default,
                   help="AdamW weight decay (default %(default)s)")
    q.add_argument("--max-len", type=int, default=d["max_len"].default,
                   help="tokens per transcript, [CLS] and [SEP] included (default %(default)s)")
    q.add_argument("--num-workers", type=int, default=d["num_workers"].default,
                   help="DDP workers; 0 = Ray Train local mode (default %(default)s)")
    q.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    q.add_argument("--seed", type=int, default=d["seed"].default, help="random seed: head initialisation and "
                                                                      "shuffling (default %(default)s)")
    q.add_argument("--patience", type=int, default=None, help="early stop after N epochs without improvement "
                                                              "(default: none, train every epoch)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from psamf.config import ConfigError
    from psamf.pretrain import PretrainConfig, format_report, pretrain

    try:
        cfg = PretrainConfig(data=args.data, model=args.model, out=args.out, tokenizer=args.tokenizer,
                             name=args.name, storage_path=args.storage_path, s3_endpoint=args.s3_endpoint,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
                             weight_decay=args.weight_decay, max_len=args.max_len, num_workers=args.num_workers,
                             use_gpu=args.use_gpu,
                             seed=args.seed, patience=args.patience)
        res = pretrain(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"psamf personality pretrain: error: {e}", file=sys.stderr)
        return 2
    print(format_report(res.metrics))
    print(f"wrote {res.out} (use: model.personality_model={res.out} or "
          f"psamf prepare --personality-model {res.out})")
    return 0
