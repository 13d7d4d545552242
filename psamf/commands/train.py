"""`psamf train` and `jobs/train.py`: train PSA-MF with Ray Train (embedded local Ray, or the cluster in RAY_ADDRESS).

Exit status: 0 done, 2 bad configuration (no worker started), 1 training failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile

from psamf.commands.common import add_config_arguments, load_config, parse_seeds
from psamf.config import Config, ConfigError
from psamf.preflight import check_placeholders
from psamf.results import TrainResult, chance_line, code_version, floors_line, metrics_table
from psamf.study import GridInterrupted
from psamf.train import train

HELP = "train PSA-MF with Ray Train (embedded local Ray, or the cluster in RAY_ADDRESS)"

log = logging.getLogger("psamf.train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--run-name", help="run.name (the resume key: re-using a name resumes that run)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 1111,1112,1113: one run per seed "
                                   "(<run-name>-seed<k>), then mean ± std")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny preset for 2 epochs on freshly synthesised MOSI-shaped data (keeps only the run "
                        "section of the config); data and run in a temporary directory, or next to the runs when "
                        "run.storage_path is remote; joins RAY_ADDRESS when set, else an embedded local Ray")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args, {"run.name": args.run_name} if getattr(args, "run_name", None) else None)


def smoke_config(cfg: Config, workdir: str) -> Config:
    """`--smoke-test`: the tiny preset for 2 epochs on freshly synthesised MOSI-shaped data, keeping only the
    `run` section (name, storage, workers, GPU) and `data.s3_endpoint` of `cfg`.

    Data and runs go to `workdir` (a temporary directory) unless `run.storage_path` is remote (s3://, gs://):
    then the shards are written next to the runs (`<storage_path>/<run.name>.smoke-data`), so that workers on
    other nodes can read them, and the run is kept there like any other."""
    from psamf.prepare import prepare
    from psamf.synth import synthesize

    tiny = Config.from_preset("tiny")
    d = tiny.to_dict()
    d["run"] = cfg.to_dict()["run"]
    d["data"]["s3_endpoint"] = cfg.data.s3_endpoint
    base = Config.from_dict(d, source="smoke test")
    remote = "://" in base.run.storage_path
    data_uri = (f"{base.run.storage_path.rstrip('/')}/{base.run.name}.smoke-data" if remote
                else os.path.join(workdir, "shards"))
    paths = synthesize("mosi", "mmsa", os.path.join(workdir, "synth"), seed=0, scale=0.15)
    prepare({"format": "mmsa", "input": str(paths["pickle"]), "dataset": "mosi"}, data_uri,
            tokenizer=base.data.tokenizer, personality_tokenizer=base.data.personality_tokenizer,
            max_text_len=base.data.max_text_len, s3_endpoint=base.run.s3_endpoint or base.data.s3_endpoint)
    items = [f"data.uri={data_uri}", "data.dataset=mosi", "optim.epochs=2", "run.max_failures=0"]
    if not remote:
        items.append(f"run.storage_path={os.path.join(workdir, 'runs')}")
    return base.override(items)


def print_result(res: TrainResult, out=sys.stdout) -> None:
    if res.seeds:
        for r in res.seeds:
            print(f"  {r.run_name}: {r.run_dir}", file=out)
        print(res.table, file=out)
        print(f"summary: {res.paths.get('summary')}", file=out)
        return
    m = res.metrics
    sel = m["selection"]
    print(f"run {res.run_name}: selected epoch {sel['selected_epoch']} of {sel['epochs_trained']} trained (numbered "
          f"from 0, as in history.json and checkpoint_epoch=NNN), by {sel['metric']} ({sel['mode']}, validation "
          "only); test evaluated once on it", file=out)
    print(res.table or metrics_table(m), file=out)
    print(floors_line(m["baselines"]["test"]), file=out)
    if (line := chance_line(m)) is not None:
        print(line, file=out)
    print(f"outputs: {res.run_dir}  (metrics.json, predictions.parquet, curves.png, tensorboard/, "
          f"checkpoint_epoch=NNN/)", file=out)


def run(args: argparse.Namespace) -> int:
    """`psamf train` / jobs/train.py. Exit status 0 done, 2 bad configuration (no worker started), 1 failed, 130
    a --seeds grid interrupted (the same command continues it)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        seeds = parse_seeds(getattr(args, "seeds", None))
        check_placeholders(cfg, getattr(args, "config", None) or "the config")  # before anything starts
    except ConfigError as e:
        print(f"psamf train: {e}", file=sys.stderr)
        return 2
    workdir = None
    try:
        if getattr(args, "smoke_test", False):
            workdir = tempfile.mkdtemp(prefix="psamf-smoke-")
            cfg = smoke_config(cfg, workdir)
        cv = code_version()
        # the resolved config goes to the run directory (fit writes it once the checks pass), not into the console
        # or job log
        names = (f"{cfg.run.name}-seed{{{','.join(map(str, seeds))}}}" if seeds and len(seeds) > 1
                 else f"{cfg.run.name}-seed{seeds[0]}" if seeds else cfg.run.name)
        log.info("psamf train: run %s, code %s (psamf %s, source sha256 %s); once the checks pass, its resolved config "
                 "goes to %s/%s/config.yaml",
                 cfg.run.name, cv["git_sha"] or "unknown git commit", cv["psamf_version"], cv["source_sha256"][:12],
                 cfg.run.storage_path.rstrip("/"), names)
        res = train(cfg, seeds=seeds)
        print_result(res)
        if workdir and res.run_dir.startswith(workdir):
            print("(smoke test: the run directory is temporary and is deleted now)")
    except ConfigError as e:
        print(f"psamf train: {e}", file=sys.stderr)
        return 2
    except GridInterrupted as e:  # --seeds
        print(f"psamf train: {e}. Continue it: the same command again (runs resume by name)", file=sys.stderr)
        return 130
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0

