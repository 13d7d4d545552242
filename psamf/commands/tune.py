"""`psamf tune`: a Ray Tune search over PSA-MF's configuration (see `psamf.tune`).

    psamf tune --config jobs/search/tiny-demo.yaml --name tiny-search [--storage runs] [section.key=value ...]
    psamf tune --resume tiny-search [--storage runs]

Exit status: 0 done, 2 bad input (nothing started; the message names the key and the file), 1 failed, 130
interrupted (Ctrl+C: the trials so far are kept; `--resume NAME` continues).
"""

from __future__ import annotations

import argparse
import logging
import sys

from psamf.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="search file (YAML: base, metric, mode, space, ...; see jobs/search/)")
    p.add_argument("--name", help="search name: the directory <storage>/<name> (the resume key)")
    p.add_argument("--storage", default=None, help="storage path, local or s3:// (default: the base config's "
                                                   "run.storage_path; with --resume: runs)")
    p.add_argument("--resume", metavar="NAME", default=None,
                   help="continue the interrupted search NAME without rerunning its finished trials")
    p.add_argument("--s3-endpoint", default=None, help="custom S3 endpoint for --resume from s3:// storage")
    p.add_argument("overrides", nargs="*", default=[],
                   help="section.key=value added to the search file's base.overrides, e.g. data.uri=s3://... "
                        "(not with --resume: a search keeps the base it started with)")


def run(args: argparse.Namespace) -> int:
    from psamf import tune

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.resume:
            if args.config:
                raise ConfigError("--resume NAME takes the search saved under NAME; drop --config")
            if args.overrides:
                raise ConfigError(f"--resume NAME continues the search with the base it started with; drop "
                                  f"{' '.join(args.overrides)}")
            space = tune.load_search(args.resume, args.storage or "runs", args.s3_endpoint)
            res = tune.run_search(space, name=args.resume, storage_path=args.storage, resume=True)
        else:
            if not args.config or not args.name:
                raise ConfigError("psamf tune needs --config SEARCH.yaml and --name NAME (or --resume NAME)")
            space = tune.SearchSpace.from_yaml(args.config, args.overrides)
            res = tune.run_search(space, name=args.name, storage_path=args.storage)
    except ConfigError as e:
        print(f"psamf tune: {e}", file=sys.stderr)
        return 2
    if res.interrupted:
        storage = res.path.rsplit("/", 1)[0]
        print(f"search interrupted: {res.path} has its trials so far (trials.csv, plots/); continue it with "
              f"`psamf tune --resume {res.name} --storage {storage}` (Ray's Tuner.restore hint above is the same)")
        return 130
    print(f"search outputs: {res.path}  (trials.csv, best.yaml, metrics.json, plots/, "
          f"tensorboard --logdir {res.path})")
    return 0
