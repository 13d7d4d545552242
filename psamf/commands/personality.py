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
    q.add_argument("--tokenizer", default=None, help="default: the model's own (psamf:tiny for the tiny config)")
    q.add_argument("--name", default="personality-pretrain", help="run name (re-run the same name to resume)")
    q.add_argument("--storage-path", default="runs", help="where the run directory with checkpoints lives")
    q.add_argument("--s3-endpoint", default=None, help="custom S3 endpoint (else AWS_ENDPOINT_URL_S3)")
    q.add_argument("--epochs", type=int, default=5)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate (default 5e-5)")
    q.add_argument("--head-lr", type=float, default=1e-3, help="regression head learning rate (default 1e-3)")
    q.add_argument("--max-len", type=int, default=64, help="tokens per transcript, [CLS] and [SEP] included")
    q.add_argument("--num-workers", type=int, default=1, help="DDP workers; 0 = Ray Train local mode")
    q.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--patience", type=int, default=None, help="early stop after N epochs without improvement")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from psamf.config import ConfigError
    from psamf.pretrain import PretrainConfig, format_report, pretrain

    try:
        cfg = PretrainConfig(data=args.data, model=args.model, out=args.out, tokenizer=args.tokenizer,
                             name=args.name, storage_path=args.storage_path, s3_endpoint=args.s3_endpoint,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
                             max_len=args.max_len, num_workers=args.num_workers, use_gpu=args.use_gpu,
                             seed=args.seed, patience=args.patience)
        res = pretrain(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"psamf personality pretrain: error: {e}", file=sys.stderr)
        return 2
    print(format_report(res.metrics))
    print(f"wrote {res.out} (use: model.personality_model={res.out} or "
          f"psamf prepare --personality-model {res.out})")
    return 0
