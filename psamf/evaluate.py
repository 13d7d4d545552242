"""Evaluate a saved checkpoint on whole splits, in this process or on N Ray Train workers.

    evaluate_checkpoint(checkpoint, splits=("valid", "test"), num_workers=0) -> {split: SplitEval}

`checkpoint` is a checkpoint directory (`.../checkpoint_epoch=NNN`, local or `s3://`) or a run directory, in which
case the run's selected checkpoint is used (`psamf.checkpoint.resolve_checkpoint`: found inside the directory
named, so a copied run directory evaluates its own checkpoint). The model and data come from the checkpoint's own
`config.yaml` (overridable). With `num_workers=0` the split is streamed through one process (the driver); with
`num_workers >= 1` a `TorchTrainer` runs the same `psamf.engine.evaluate` on every rank over a disjoint part of the
split, gathers predictions, labels and ids from every rank, and checks that no sample is missing or counted twice:
the same code path as the per-epoch validation in `psamf.train`. Both ways give the same prediction per sample (up
to float round-off from batch padding).

    write_eval_plots(out_dir, results) -> [paths]

writes, per split, `<split>_confusion_7class.png` (the Acc-7 classes, counts in the cells), the same counts as
`<split>_confusion_7class.csv`, and `<split>_scatter.png` (prediction against label with the identity line) into a
local or `s3://` directory, each file atomically (`psamf.storage.write_bytes`); `psamf evaluate` puts them next to
its metrics JSON.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from psamf.checkpoint import (CheckpointError, checkpoint_config, is_converted, load_model_weights,
                              open_checkpoint, resolve_checkpoint, verify_checkpoint)
from psamf.config import Config, ConfigError
from psamf.data import iter_batches, load_datasets
from psamf.engine import EvalOutput, eval_metrics, eval_partition, evaluate, gather_eval, resolve_amp, \
    seed_everything
from psamf.model import build_model
from psamf.preflight import check_prediction_inputs, read_manifest

__all__ = ["SplitEval", "evaluate_checkpoint", "write_eval_plots"]

log = logging.getLogger("psamf.evaluate")


@dataclass
class SplitEval:
    split: str
    metrics: dict[str, float]
    ids: list[str] = field(default_factory=list)
    pred: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    dataset: str = "mosi"  # DataConfig.dataset of the evaluation: the label range of the plots


def _result(out: EvalOutput, dataset: str, split: str, expected: int | None, world: int = 1) -> dict[str, Any]:
    if expected is not None and out.n != expected:
        raise RuntimeError(f"{split}: evaluated {out.n} samples across {world} worker(s), the split has {expected}")
    return {"ids": out.ids, "pred": out.pred.tolist(), "label": out.label.tolist(),
            "metrics": eval_metrics(out, dataset, "")}


def _eval_fn_per_worker(loop_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker: load the checkpoint, evaluate this rank's part of each split, gather, return on rank 0."""
    import ray.train

    from psamf.train import worker_device

    cfg = Config.from_dict(loop_config["config"], source="eval loop config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    seed_everything(cfg.optim.seed)
    model = build_model(cfg.model).to(device)
    with open_checkpoint(loop_config["checkpoint"]) as d:
        load_model_weights(d, model)
    keep = None if world == 1 else eval_partition(rank, world)
    out = {}
    for split in loop_config["splits"]:
        batches = iter_batches(ray.train.get_dataset_shard(split), cfg.data, loop_config["batch_size"], epoch=0,
                               train=False, device="cpu", pin_memory=device.type == "cuda")  # labels on the host
        merged = gather_eval(evaluate(model, batches, cfg, device=device, keep=keep,
                                      amp_dtype=resolve_amp(cfg.optim.amp, device)))
        out[split] = _result(merged, cfg.data.dataset, split, (loop_config.get("counts") or {}).get(split), world)
    return out if rank == 0 else None


def _evaluate_on_workers(cfg: Config, ck: Any, datasets: Mapping[str, Any], splits: Sequence[str],
                         counts: Mapping[str, int], batch_size: int, num_workers: int) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from psamf.runtime import fit_trainer
    from psamf.storage import resolve

    st = resolve(cfg.run.storage_path, cfg.run.s3_endpoint or cfg.data.s3_endpoint)
    name = f"{cfg.run.name}.eval-{uuid.uuid4().hex[:8]}"
    res = cfg.run.resources_per_worker()
    trainer = TorchTrainer(
        _eval_fn_per_worker,
        train_loop_config={"config": cfg.to_dict(), "splits": list(splits), "counts": dict(counts),
                           "batch_size": batch_size, "checkpoint": ck},
        datasets=dict(datasets),
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # every rank streams whole splits
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=cfg.run.use_gpu,
                                               resources_per_worker=res),
        run_config=ray.train.RunConfig(name=name, storage_path=st.storage_path,
                                       storage_filesystem=st.storage_filesystem),
    )
    try:
        result = fit_trainer(trainer, cfg.run.controller_poll_s)
    finally:
        try:
            st.fs.delete_dir(st.run_dir(name))  # Ray's run state of this throwaway evaluation run
        except OSError:
            pass
    if result.error is not None:
        raise result.error
    return result.return_value


def worker_count_note(checkpoint_dir: str, cfg: Config, num_workers: int) -> str | None:
    """Why the loss terms of this evaluation may differ from the run's own validation: None when the worker
    counts agree, or when the checkpoint was never validated by a psamf run (a converted one: no epoch)."""
    import pyarrow.fs as pafs

    if is_converted(pafs.LocalFileSystem(), checkpoint_dir):
        return None
    trained_on = max(1, cfg.run.num_workers)
    if trained_on == max(1, num_workers):
        return None
    return (f"the run validated on {trained_on} worker(s), this evaluation uses {max(1, num_workers)}: the in-batch "
            "loss terms (ccl, clm, total) see other batches and differ from the run's; MAE, Corr and accuracies do "
            f"not (--num-workers {trained_on} reproduces the run's)")


def _check_personality_input(trained_cfg: Config, cfg: Config, manifest: Mapping[str, Any]) -> None:
    """Other shards than the checkpoint's own (an overridden data.uri or data.use_precomputed_personality) must give
    the model CLS_p from the encoder it was trained on (`psamf.preflight.check_personality_source`)."""
    from psamf.preflight import check_personality_source, personality_source

    if (cfg.data.uri, cfg.data.use_precomputed_personality) == \
            (trained_cfg.data.uri, trained_cfg.data.use_precomputed_personality):
        return
    try:
        trained = personality_source(trained_cfg, read_manifest(trained_cfg.data.uri, trained_cfg.data.s3_endpoint))
    except ConfigError as e:
        log.warning("the checkpoint's training shards (data.uri=%s) cannot be read (%s): which personality encoder "
                    "its CLS_p came from is not checked against %s", trained_cfg.data.uri, e, cfg.data.uri)
        return
    check_personality_source(cfg, manifest, trained)


def evaluate_checkpoint(checkpoint: str, *, splits: Sequence[str] = ("valid", "test"), num_workers: int = 0,
                        overrides: Sequence[str] = (), s3_endpoint: str | None = None,
                        batch_size: int | None = None) -> dict[str, SplitEval]:
    """Evaluate a checkpoint (or a run's selected checkpoint) on whole splits. See the module docstring."""
    import pyarrow.fs as pafs
    import ray.train
    import torch

    from psamf import runtime

    fixed = [o for o in overrides
             if not ((k := o.split("=", 1)[0].strip()).startswith(("data.", "run.")) or k == "optim.amp")]
    if fixed:
        raise ConfigError(f"overrides {fixed}: only data.*, run.* and optim.amp can change for evaluation (the "
                          "model, its loss and optimiser are the checkpoint's; --batch-size sets the evaluation batch)")
    fs, ck_path = resolve_checkpoint(checkpoint, s3_endpoint=s3_endpoint)
    with tempfile.TemporaryDirectory(prefix="psamf-eval-") as tmp:
        local = os.path.join(tmp, "ckpt")
        os.makedirs(local)
        pafs.copy_files(ck_path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        problems = verify_checkpoint(pafs.LocalFileSystem(), local)  # named as the user named them, not the copy
        if problems:
            raise CheckpointError("; ".join(p.replace(local, ck_path) for p in problems))
        trained_cfg = checkpoint_config(local)
        cfg = trained_cfg.override(list(overrides))
        manifest = read_manifest(cfg.data.uri, cfg.data.s3_endpoint)
        _check_personality_input(trained_cfg, cfg, manifest)
        counts = {s: int(n) for s, n in (manifest.get("counts") or {}).items()}
        have = sorted(counts)
        missing = [s for s in splits if s not in have]
        if missing or not splits:
            what = f"no split {', '.join(map(repr, missing))}" if missing else "no split given"
            raise ConfigError(f"--splits {','.join(splits)!r}: {what} (the data set at {cfg.data.uri} has "
                              f"{', '.join(have)})")
        for split in splits:  # the shards must fit the fixed model: data set, tokenizers, text length, widths
            check_prediction_inputs(cfg, manifest, split)
        log.info("evaluating %s on %s", ck_path, ", ".join(splits))
        note = worker_count_note(local, cfg, num_workers)
        if note:
            log.info("%s", note)
        runtime.init_ray(max(1, num_workers))
        bs = batch_size or cfg.optim.batch_size
        datasets = load_datasets(cfg.data, manifest, tuple(splits))
        if num_workers <= 0:
            model = build_model(cfg.model)
            load_model_weights(local, model, name=ck_path)
            results = {}
            for split in splits:
                batches = iter_batches(datasets[split], cfg.data, bs, epoch=0, train=False)
                out = EvalOutput.merge([evaluate(model, batches, cfg, device=torch.device("cpu"))])
                results[split] = _result(out, cfg.data.dataset, split, counts.get(split))
        else:
            results = _evaluate_on_workers(cfg, ray.train.Checkpoint(ck_path, filesystem=fs), datasets, splits,
                                           counts, bs, num_workers)
    return {s: SplitEval(split=s, metrics=r["metrics"], ids=list(r["ids"]), pred=np.asarray(r["pred"], np.float32),
                         label=np.asarray(r["label"], np.float32), dataset=cfg.data.dataset)
            for s, r in results.items()}


def _confusion_csv(counts: np.ndarray) -> bytes:
    from psamf.metrics import CLASSES_7

    lines = ["label/pred," + ",".join(str(c) for c in CLASSES_7)]
    lines += [f"{c}," + ",".join(str(int(v)) for v in row) for c, row in zip(CLASSES_7, counts)]
    return ("\n".join(lines) + "\n").encode()


def write_eval_plots(out_dir: str, results: Mapping[str, SplitEval], *, s3_endpoint: str | None = None) -> list[str]:
    """Per split: `<split>_confusion_7class.png` / `.csv` and `<split>_scatter.png` in `out_dir` (local or a URI).

    Returns the paths written. Each file is written atomically; a split without samples is skipped with a
    warning (nothing to plot)."""
    from psamf import datasets
    from psamf.metrics import confusion_7class
    from psamf.outputs import plot_confusion_7class, plot_scatter
    from psamf.storage import resolve, write_bytes

    st = resolve(out_dir, s3_endpoint)
    if st.fs is None:
        raise ConfigError(f"{out_dir}: plots can be written to local paths and s3:// (or other pyarrow) URIs only")
    written = []
    for split, r in results.items():
        if r.pred.size == 0:
            log.warning("%s: no samples, no plots", split)
            continue
        rng = datasets.get(r.dataset).label_range
        counts = confusion_7class(r.pred, r.label, rng)
        mae, acc7 = r.metrics.get("mae"), r.metrics.get("acc7")
        stats = ", ".join(f"{k} {v:.3f}" for k, v in (("MAE", mae), ("Acc-7", acc7)) if isinstance(v, float))
        head = f"{r.dataset} {split} (n={int(counts.sum())}{', ' + stats if stats else ''})"
        confusion_png = plot_confusion_7class(counts, f"7-class confusion matrix\n{head}")
        files = ((f"{split}_confusion_7class.png", confusion_png),
                 (f"{split}_confusion_7class.csv", _confusion_csv(counts)),
                 (f"{split}_scatter.png", plot_scatter(r.pred, r.label, head, rng)))
        for name, data in files:
            write_bytes(st.fs, st.join(name), data)
            written.append(f"{st.uri.rstrip('/')}/{name}")
    return written
