"""`psamf evaluate`: evaluate a saved checkpoint on whole splits, in this process or on N Ray Train workers.

    evaluate_checkpoint(checkpoint, splits=("valid", "test"), num_workers=0) -> {split: SplitEval}

`checkpoint` is a checkpoint directory (`.../checkpoint_epoch=NNN`, local or `s3://`) or a run directory, in which
case the run's selected checkpoint (`metrics.json` -> `checkpoint`) is used. The model and data come from the
checkpoint's own `config.yaml` (overridable). With `num_workers=0` the split is streamed through one process (the
driver); with `num_workers >= 1` a `TorchTrainer` runs the same `psamf.train.evaluate` on every rank over a
disjoint part of the split (a stable hash of the sample id), gathers predictions, labels and ids from every rank,
and checks that no sample is missing or counted twice — the same code path as the per-epoch validation in
`psamf.train`. Both ways give the same prediction per sample (up to float round-off from batch padding).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from psamf.config import Config, ConfigError

__all__ = ["SplitEval", "resolve_checkpoint", "evaluate_checkpoint", "add_arguments", "run"]

log = logging.getLogger("psamf.evaluate")


@dataclass
class SplitEval:
    split: str
    metrics: dict[str, float]
    ids: list[str] = field(default_factory=list)
    pred: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def by_id(self) -> dict[str, float]:
        return dict(zip(self.ids, self.pred.tolist()))


def _fs_and_path(uri: str, s3_endpoint: str | None):
    from psamf.outputs import storage_target

    st = storage_target(uri, s3_endpoint)
    return st.fs, st.root


def resolve_checkpoint(uri: str, *, s3_endpoint: str | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, checkpoint path) for a checkpoint directory or a run directory (selected checkpoint)."""
    from psamf.outputs import exists, read_json

    fs, path = _fs_and_path(uri, s3_endpoint)
    if exists(fs, f"{path}/model.pt"):
        return fs, path
    if exists(fs, f"{path}/metrics.json"):
        ck = read_json(fs, f"{path}/metrics.json").get("checkpoint")
        if not ck:
            raise ConfigError(f"{uri}/metrics.json names no checkpoint (a local-mode run keeps none)")
        fs2, p2 = _fs_and_path(ck, s3_endpoint) if "://" in ck else (fs, ck)
        if not exists(fs2, f"{p2}/model.pt"):
            raise ConfigError(f"{uri}: the selected checkpoint {ck} is gone")
        return fs2, p2
    raise ConfigError(f"{uri}: neither a checkpoint directory (model.pt) nor a finished run directory (metrics.json)")


def _download(fs, path: str, dest: str) -> str:
    import pyarrow.fs as pafs

    os.makedirs(dest, exist_ok=True)
    pafs.copy_files(path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def _eval_fn_per_worker(loop_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker: load the checkpoint, evaluate this rank's part of each split, gather, return on rank 0."""
    import ray.train

    from psamf import train as T

    cfg = Config.from_dict(loop_config["config"], source="eval loop config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = T._device()
    amp_dtype = T.resolve_amp(cfg.optim.amp, device)
    T.seed_everything(cfg.optim.seed)
    model = T.build_model(cfg.model).to(device)
    with T.local_checkpoint(loop_config["checkpoint"]) as d:
        T.load_model_weights(d, model)
    keep = None if world == 1 else T._partition(rank, world)
    out = {}
    for split in loop_config["splits"]:
        shard = ray.train.get_dataset_shard(split)
        part = T.evaluate(model, T._iter(shard, cfg, loop_config["batch_size"], epoch=0, train=False), cfg,
                          device=device, amp_dtype=amp_dtype, keep=keep)
        merged = T.gather_eval(part)
        expected = (loop_config.get("counts") or {}).get(split)
        if expected is not None and merged.n != expected:
            raise RuntimeError(f"{split}: evaluated {merged.n} samples across {world} worker(s), the split has "
                               f"{expected}")
        out[split] = {"ids": merged.ids, "pred": merged.pred.tolist(), "label": merged.label.tolist(),
                      "metrics": T.eval_metrics(merged, cfg.data.dataset, ""), "n_local": part.n}
    return out if rank == 0 else None


def evaluate_checkpoint(checkpoint: str, *, splits: Sequence[str] = ("valid", "test"), num_workers: int = 0,
                        overrides: Sequence[str] = (), s3_endpoint: str | None = None,
                        batch_size: int | None = None) -> dict[str, SplitEval]:
    """Evaluate a checkpoint (or a run's selected checkpoint) on whole splits. See the module docstring."""
    import ray

    from psamf import data
    from psamf import train as T

    fs, ck_path = resolve_checkpoint(checkpoint, s3_endpoint=s3_endpoint)
    with tempfile.TemporaryDirectory(prefix="psamf-eval-") as tmp:
        local = _download(fs, ck_path, os.path.join(tmp, "ckpt"))
        cfg = T.checkpoint_config(local).override(list(overrides))
        T.init_ray(max(1, num_workers))
        manifest = T._read_manifest(cfg.data.uri, cfg.data.s3_endpoint)
        counts = {s: int(n) for s, n in (manifest.get("counts") or {}).items()}
        bs = batch_size or cfg.optim.batch_size
        datasets = T.load_datasets(cfg.data, manifest, tuple(splits))
        results: dict[str, Any]
        if num_workers <= 0:
            import torch

            model = T.build_model(cfg.model)
            T.load_model_weights(local, model)
            results = {}
            for split in splits:
                out = T.EvalOutput.merge([T.evaluate(model, T._iter(datasets[split], cfg, bs, epoch=0, train=False),
                                                     cfg, device=torch.device("cpu"))])
                if out.n != counts.get(split, out.n):
                    raise RuntimeError(f"{split}: evaluated {out.n} samples, the split has {counts[split]}")
                results[split] = {"ids": out.ids, "pred": out.pred.tolist(), "label": out.label.tolist(),
                                  "metrics": T.eval_metrics(out, cfg.data.dataset, "")}
        else:
            import ray.train
            from ray.train.torch import TorchTrainer

            from psamf.outputs import storage_target

            st = storage_target(cfg.run.storage_path, cfg.run.s3_endpoint or cfg.data.s3_endpoint)
            name = f"{cfg.run.name}.eval-{uuid.uuid4().hex[:8]}"
            res = {"CPU": cfg.run.cpus_per_worker}
            if cfg.run.use_gpu:
                res["GPU"] = cfg.run.gpus_per_worker
            trainer = TorchTrainer(
                _eval_fn_per_worker,
                train_loop_config={"config": cfg.to_dict(), "splits": list(splits), "counts": counts,
                                   "batch_size": bs,
                                   "checkpoint": ray.train.Checkpoint(ck_path, filesystem=fs)},
                datasets=dict(datasets),
                dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # every rank streams whole splits
                scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=cfg.run.use_gpu,
                                                       resources_per_worker=res),
                run_config=ray.train.RunConfig(name=name, storage_path=st.storage_path,
                                               storage_filesystem=st.storage_filesystem),
            )
            try:
                result = trainer.fit()
            finally:
                try:
                    st.fs.delete_dir(st.run_dir(name))  # Ray's run state of this throwaway evaluation run
                except OSError:
                    pass
            if result.error is not None:
                raise result.error
            results = result.return_value
    return {s: SplitEval(split=s, metrics=r["metrics"], ids=list(r["ids"]), pred=np.asarray(r["pred"], np.float32),
                         label=np.asarray(r["label"], np.float32)) for s, r in results.items()}


# ---------------------------------------------------------------------------------------------
# CLI: psamf evaluate (and jobs/evaluate.py)
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory or run directory (local or s3://); a run directory "
                                      "means its validation-selected checkpoint")
    p.add_argument("--splits", default="valid,test", help="comma-separated splits (default: valid,test)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="0 = in this process; N = N Ray Train workers (predictions gathered from every rank)")
    p.add_argument("--s3-endpoint", default=None, help="custom S3 endpoint (else AWS_ENDPOINT_URL_S3)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", default=None, help="write the metrics as JSON here (local path)")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to the checkpoint's config "
                                                "(e.g. data.uri=...)")


def run(args: argparse.Namespace) -> int:
    import json

    from psamf.outputs import json_safe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        res = evaluate_checkpoint(args.checkpoint, splits=[s for s in args.splits.split(",") if s],
                                  num_workers=args.num_workers, overrides=args.overrides or [],
                                  s3_endpoint=args.s3_endpoint, batch_size=args.batch_size)
    except ConfigError as e:
        print(f"psamf evaluate: {e}", file=sys.stderr)
        return 2
    from psamf.train import metrics_table

    if set(res) >= {"valid", "test"}:
        print(metrics_table({"valid": res["valid"].metrics, "test": res["test"].metrics}))
    else:
        for s, r in res.items():
            print(s, json.dumps(json_safe(r.metrics), indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(json_safe({s: r.metrics for s, r in res.items()}), f, indent=2)
    return 0
