"""`psamf personality pretrain` at the Ray edge: fine-tune a BERT-family encoder on Big Five traits.

Plain PyTorch lives in `psamf.personality` (corpus, model, step, metrics, export); this module adds Ray Train
around it, the way `psamf.train` wraps `psamf.engine`:

    train_fn_per_worker(loop_config)   DDP model, the train split streamed from a Ray dataset shard, every epoch
                                       a validation pass, a checkpoint and a report; resume from the latest
    pretrain(cfg) -> PretrainResult    read + tokenise, fit, load the selected epoch, compare with the untrained
                                       encoder on the held-out split, export the Hugging Face directory

Selection is on validation only (`val_mean_mae`, lower is better, the later epoch on ties, `psamf.engine.Selector`);
test is looked at once, for the selected epoch. Every rank evaluates the whole validation split (it travels in
the loop config: Big Five corpora are a few thousand short transcripts), so every rank selects the same epoch.
Resume: a run is `<storage>/<name>/`; re-running the same name continues from its latest checkpoint (Ray Train's
`get_checkpoint()`, or `psamf.checkpoint.LocalCheckpoints` in local mode, `num_workers=0`), and a finished run
trains no further epoch. A run directory records the corpus, model and tokenizer it was started with, and
refuses to continue with others.

The untrained baseline: the same encoder as training starts from (same weights: a hub/local model as loaded,
`TINY_CONFIG` seeded), frozen, a ridge regression on its CLS fitted on train (alpha chosen on valid). The
pretrained encoder is reported twice: with its trained head, and with the same ridge on its frozen CLS (what
PSA-MF can use of it, since PSA-MF reads the CLS only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from psamf.checkpoint import CHECKPOINT_DIR, LocalCheckpoints, open_checkpoint
from psamf.config import ConfigError
from psamf.engine import Selector, all_gather, rng_state, seed_everything, set_rng_state
from psamf.personality import (METRICS_FILE, TRAITS, TraitRegressor, build_encoder, check_export_target,
                               cls_features, default_tokenizer, export_encoder, fit_ridge, predict_traits,
                               pretrain_step, read_bigfive, ridge_predict, tokenize, trait_metrics)

__all__ = ["PretrainConfig", "PretrainResult", "train_fn_per_worker", "build_trainer", "pretrain", "format_report",
           "SELECT_METRIC"]

log = logging.getLogger("psamf.pretrain")

SELECT_METRIC = "val_mean_mae"
RUN_FILE = "pretrain_run.json"  # what the run was started with (the resume guard)


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; travels to the workers as a dict."""

    data: str  # Big Five corpus (CSV/TSV/Parquet, local or s3://)
    model: str  # hub name, local directory, or psamf.personality.TINY_CONFIG
    out: str  # the exported Hugging Face directory (local)
    tokenizer: str | None = None  # default: psamf.personality.default_tokenizer(model)
    name: str = "personality-pretrain"  # run name: resume by name
    storage_path: str = "runs"  # where the run directory (checkpoints) lives, local or s3://
    s3_endpoint: str | None = None
    epochs: int = 5
    batch_size: int = 32
    lr: float = 5e-5  # encoder
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    max_len: int = 64
    num_workers: int = 1  # 0 = Ray Train local mode (in this process)
    use_gpu: bool = False
    seed: int = 0
    patience: int | None = None  # early stop after this many epochs without a strict improvement
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = default_tokenizer(self.model)
        for k in ("epochs", "batch_size", "max_len", "keep_checkpoints"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"personality pretrain: {k} must be >= 1, got {getattr(self, k)}")
        if self.num_workers < 0:
            raise ConfigError(f"personality pretrain: num_workers must be >= 0, got {self.num_workers}")
        if not (self.lr > 0 and self.head_lr > 0):
            raise ConfigError("personality pretrain: lr and head_lr must be > 0")


@dataclass
class PretrainResult:
    out: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


# =============================================================================================
# The per-worker function
# =============================================================================================


class _LocalStore(LocalCheckpoints):
    """`LocalCheckpoints` reporting to Ray Train's local-mode session (which itself keeps nothing)."""

    def report(self, metrics: Mapping[str, Any], local_dir: str | None, epoch: int, history: Sequence[Any]) -> None:
        import ray.train

        if local_dir:
            self.save(local_dir, epoch, history)
        ray.train.report(dict(metrics))

    def selected_path(self, epoch: int) -> str:
        path = self.path(epoch)
        if path is None:
            raise RuntimeError(f"the checkpoint of the selected epoch {epoch} is not in {self.run_dir}")
        return path


class _RayStore:
    """Checkpoints through Ray Train (restore from `get_checkpoint()`, one per epoch with the report)."""

    def latest(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: Mapping[str, Any], local_dir: str | None, epoch: int, history: Sequence[Any]) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(local_dir) if local_dir else None
        ray.train.report(dict(metrics), checkpoint=ckpt, checkpoint_dir_name=CHECKPOINT_DIR.format(epoch=epoch))
        ray.train.get_all_reported_checkpoints()  # registered before the next epoch (see psamf.train)

    def selected_path(self, epoch: int) -> str:
        import ray.train

        kept = [r for r in ray.train.get_all_reported_checkpoints() if int(r.metrics.get("epoch", -1)) == epoch]
        if not kept:
            raise RuntimeError(f"the checkpoint of the selected epoch {epoch} is not among the checkpoints Ray kept")
        return kept[-1].checkpoint.path


def _optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    core = model.module if hasattr(model, "module") else model
    return torch.optim.AdamW([
        {"params": list(core.encoder.parameters()), "lr": cfg.lr, "name": "encoder"},
        {"params": list(core.head.parameters()), "lr": cfg.head_lr, "name": "head"},
    ], weight_decay=cfg.weight_decay)


def _save(path: str, *, model: TraitRegressor, optimizer: Any, selector: Selector, epoch: int,
          history: list[dict[str, Any]], rngs: list[Any]) -> None:
    torch.save(model.state_dict(), os.path.join(path, "model.pt"))
    torch.save({"optimizer": optimizer.state_dict(), "selector": selector.state_dict(), "epoch": epoch,
                "history": json.dumps(history), "rng": rngs}, os.path.join(path, "train_state.pt"))
    with open(os.path.join(path, "meta.json"), "w") as f:  # last: a directory without it is incomplete
        json.dump({"epoch": epoch, "kind": "personality-pretrain"}, f)


def _restore(store: Any, model: TraitRegressor, optimizer: Any, selector: Selector, rank: int, world: int,
             seed: int) -> tuple[int, list[dict[str, Any]]]:
    """(first epoch to train, history) from the latest checkpoint, or (0, []) and fresh RNG streams."""
    ckpt = store.latest()
    if ckpt is None:
        seed_everything(seed + rank)
        return 0, []
    with open_checkpoint(ckpt) as d:
        model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True))
        state = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    selector.load_state_dict(state["selector"])
    rngs = state.get("rng") or []
    if len(rngs) == world:
        set_rng_state(rngs[rank])
    else:
        seed_everything(seed + 1000 * (int(state["epoch"]) + 1) + rank)
    return int(state["epoch"]) + 1, json.loads(state["history"])


def train_fn_per_worker(loop_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function. `loop_config`: {"config": PretrainConfig as a dict, "valid": {token
    columns..., "traits"} as lists, "storage": (storage_path, s3_endpoint)}."""
    import ray.train
    import ray.train.torch

    from psamf.train import worker_device

    cfg = PretrainConfig(**loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    seed_everything(cfg.seed)  # same head init on every rank
    raw = TraitRegressor(build_encoder(cfg.model))
    selector = Selector(SELECT_METRIC, "min", cfg.patience)
    store = (_LocalStore(loop_config["storage"], cfg.name, cfg.keep_checkpoints, selector)
             if cfg.num_workers == 0 else _RayStore())
    optimizer = _optimizer(raw, cfg)
    start, history = _restore(store, raw, optimizer, selector, rank, world, cfg.seed)
    model = ray.train.torch.prepare_model(raw)
    if start >= cfg.epochs and rank == 0:
        log.info("%s had trained all %d epochs: nothing to train; its selected epoch is evaluated and exported "
                 "again", cfg.name, cfg.epochs)
    elif start > 0 and rank == 0:
        log.info("resumed %s after epoch %d (epochs are numbered from 0)", cfg.name, start - 1)
    valid = {k: np.asarray(v) for k, v in loop_config["valid"].items()}
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, cfg.epochs):
        if selector.should_stop:
            break
        t0 = time.perf_counter()
        losses = []
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True,
                                              local_shuffle_buffer_size=4 * cfg.batch_size,
                                              local_shuffle_seed=cfg.seed * 1000 + epoch):
            losses.append(pretrain_step(model, batch, optimizer, device=device))
        parts = all_gather((float(np.sum(losses)), len(losses)))
        steps = sum(p[1] for p in parts)
        if steps == 0:
            raise RuntimeError(f"epoch {epoch}: no training batch (train split smaller than batch_size x workers?)")
        val = trait_metrics(predict_traits(raw, valid, batch_size=cfg.batch_size, device=device), valid["traits"])
        rec = {"epoch": epoch, "train_mse": sum(p[0] for p in parts) / steps, "train_steps": steps,
               "val_mean_mae": val["mean_mae"], "val_mean_r": val["mean_r"],
               **{f"val_r_{t}": val["pearson_r"][t] for t in TRAITS}, "time_s": time.perf_counter() - t0}
        rec["is_best"] = selector.update(epoch, rec[SELECT_METRIC])
        rec["best_epoch"] = selector.best_epoch
        history.append(rec)
        rngs = all_gather(rng_state())
        with tempfile.TemporaryDirectory(prefix="psamf-pretrain-") as tmp:
            if rank == 0:
                _save(tmp, model=raw, optimizer=optimizer, selector=selector, epoch=epoch, history=history, rngs=rngs)
            store.report(rec, tmp if rank == 0 else None, epoch, history)
        if rank == 0:
            log.info("epoch %d: train mse %.4f, valid mean MAE %.4f, mean r %.3f", epoch, rec["train_mse"],
                     rec["val_mean_mae"], rec["val_mean_r"])
    if selector.best_epoch is None:
        raise RuntimeError("no epoch was trained")
    path = store.selected_path(selector.best_epoch)
    if rank != 0:
        return None
    return {"history": history, "selected_epoch": selector.best_epoch, "checkpoint_path": path, "world_size": world}


# =============================================================================================
# The driver
# =============================================================================================


def _lists(tokens: Mapping[str, np.ndarray], traits: np.ndarray) -> dict[str, list]:
    return {**{k: v.tolist() for k, v in tokens.items()}, "traits": traits.tolist()}


def _train_dataset(tokens: Mapping[str, np.ndarray], traits: np.ndarray) -> Any:
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    cols = {k: ArrowTensorArray.from_numpy(np.ascontiguousarray(v)) for k, v in tokens.items()}
    cols["traits"] = ArrowTensorArray.from_numpy(np.ascontiguousarray(traits, dtype=np.float32))
    return ray.data.from_arrow(pa.table(cols))


def build_trainer(cfg: PretrainConfig, train_ds: Any, valid: Mapping[str, list], storage: Any) -> Any:
    """The `TorchTrainer` of one pretraining run (`storage`: the resolved `cfg.storage_path`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    run_config = ray.train.RunConfig(
        name=cfg.name, storage_path=storage.storage_path, storage_filesystem=storage.storage_filesystem,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                     checkpoint_score_attribute=SELECT_METRIC,
                                                     checkpoint_score_order="min"))
    loop_config = {"config": dataclasses.asdict(cfg), "valid": dict(valid),
                   "storage": (cfg.storage_path if "://" in cfg.storage_path else storage.root, cfg.s3_endpoint)}
    res = {"CPU": 1, **({"GPU": 1} if cfg.use_gpu else {})}
    return TorchTrainer(train_fn_per_worker, train_loop_config=loop_config, datasets={"train": train_ds},
                        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
                        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                                               resources_per_worker=res),
                        run_config=run_config)


# what a resumed run may not change (besides data, model, tokenizer, max_len): the optimiser state and the data
# order would come back from the checkpoint; epochs, patience and the workers may change
RECIPE_KEYS = ("lr", "head_lr", "weight_decay", "batch_size", "seed")


def _guard_run(storage: Any, cfg: PretrainConfig) -> None:
    """Refuse to resume a run name that was started on another corpus, model, tokenizer or training recipe
    (RECIPE_KEYS); record a new one."""
    from psamf.storage import absolute_local, exists, read_json, same_model_name, write_json

    path = f"{storage.run_dir(cfg.name)}/{RUN_FILE}"
    # local paths are recorded absolute: the same file named from another directory is the same run
    local = {k: absolute_local(v) if os.path.exists(os.path.expanduser(v)) else v
             for k, v in (("data", cfg.data), ("model", cfg.model), ("tokenizer", cfg.tokenizer))}
    ident = {**local, "max_len": cfg.max_len, **{k: getattr(cfg, k) for k in RECIPE_KEYS}}
    if exists(storage.fs, path):
        old = read_json(storage.fs, path)
        # the recipe is compared where the run recorded it (runs started before 2026-12-02 did not)
        diff = {k: (old.get(k), v) for k, v in ident.items()
                if not (same_model_name(old.get(k), v) if k in local else old.get(k) == v)
                and (k in old or k not in RECIPE_KEYS)}
        if diff:
            changes = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in diff.items())
            raise ConfigError(f"run {cfg.name!r} in {storage.uri} was started with other settings ({changes}); "
                              "use a new --name to start afresh")
        return
    storage.fs.create_dir(storage.run_dir(cfg.name))
    write_json(storage.fs, path, ident)


def _compare(cfg: PretrainConfig, model: TraitRegressor, tokens: Mapping[str, Mapping[str, np.ndarray]],
             data: Mapping[str, Any]) -> dict[str, Any]:
    """Test metrics of the pretrained encoder (its head, and ridge on its CLS) against the untrained encoder."""
    y = {s: data[s].traits for s in data}
    seed_everything(cfg.seed)
    untrained = build_encoder(cfg.model)  # the weights training started from
    out: dict[str, Any] = {}
    for name, enc in (("untrained", untrained), ("pretrained_ridge", model.encoder)):
        x = {s: cls_features(enc, tokens[s], batch_size=cfg.batch_size) for s in ("train", "valid", "test")}
        ridge = fit_ridge(x["train"], y["train"], x["valid"], y["valid"])
        out[name] = {**trait_metrics(ridge_predict(ridge, x["test"]), y["test"]), "ridge_alpha": ridge.alpha}
    out["pretrained"] = trait_metrics(predict_traits(model, tokens["test"], batch_size=cfg.batch_size), y["test"])
    return out


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run (or resume) one pretraining run, then export `cfg.out` with METRICS_FILE. Starts or joins Ray."""
    import ray.train

    from psamf import runtime
    from psamf.storage import resolve
    from psamf.tokenizers import load_tokenizer

    t0 = time.perf_counter()
    data = read_bigfive(cfg.data, s3_endpoint=cfg.s3_endpoint)
    tokenizer = load_tokenizer(cfg.tokenizer)
    tokens = {s: tokenize(d.text, tokenizer, cfg.max_len) for s, d in data.items()}
    n_train = len(data["train"])
    if n_train < cfg.batch_size * max(1, cfg.num_workers):
        raise ConfigError(f"{cfg.data}: {n_train} training rows cannot fill one batch of {cfg.batch_size} "
                          f"on each of {max(1, cfg.num_workers)} worker(s); lower --batch-size")
    build_encoder(cfg.model)  # fail here, before Ray starts, on a model that cannot be loaded
    storage = resolve(cfg.storage_path, cfg.s3_endpoint)
    try:  # before training: the export at the end must not replace another run's encoder
        check_export_target(cfg.out, storage.run_uri(cfg.name))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _guard_run(storage, cfg)
    runtime.init_ray(cfg.num_workers)
    trainer = build_trainer(cfg, _train_dataset(tokens["train"], data["train"].traits),
                            _lists(tokens["valid"], data["valid"].traits), storage)
    result = runtime.fit_trainer(trainer, what=f"pretraining run {cfg.name}")
    if result.error is not None:
        raise result.error
    ret = result.return_value
    if not ret:
        raise RuntimeError(f"personality pretrain {cfg.name}: rank 0 returned nothing ({result})")
    model = TraitRegressor(build_encoder(cfg.model))
    with open_checkpoint(ray.train.Checkpoint(ret["checkpoint_path"], filesystem=storage.fs)) as d:
        model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True))
    model.eval()
    test = _compare(cfg, model, tokens, data)
    metrics = {
        "split": "test", "traits": list(TRAITS), "selected_epoch": ret["selected_epoch"],
        "select_metric": SELECT_METRIC, "data": cfg.data, "model": cfg.model, "tokenizer": cfg.tokenizer,
        "run": storage.run_uri(cfg.name), "counts": {s: len(d) for s, d in data.items()}, **test,
        "history": ret["history"], "wall_s": time.perf_counter() - t0,
    }
    out = export_encoder(model.encoder, tokenizer, cfg.out, metrics)
    return PretrainResult(out=out, metrics=metrics, history=ret["history"])


def format_report(metrics: Mapping[str, Any]) -> str:
    """The held-out table: per trait MAE and Pearson r for each encoder."""
    rows = [("untrained (ridge on frozen CLS)", "untrained"), ("pretrained (ridge on frozen CLS)", "pretrained_ridge"),
            ("pretrained (trained head)", "pretrained")]
    head = f"{'encoder':34s}" + "".join(f"{t[:5]:>13s}" for t in TRAITS) + f"{'mean':>13s}"
    lines = [f"held-out {metrics['split']} ({metrics['counts']['test']} rows), MAE / Pearson r; selected epoch "
             f"{metrics['selected_epoch']} by {metrics['select_metric']}", head]
    for label, key in rows:
        m = metrics[key]
        cells = "".join(f"{m['mae'][t]:6.3f}/{m['pearson_r'][t]:6.3f}" for t in TRAITS)
        lines.append(f"{label:34s}{cells}{m['mean_mae']:6.3f}/{m['mean_r']:6.3f}")
    return "\n".join(lines)
