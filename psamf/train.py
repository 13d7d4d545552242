"""`psamf train`: PSA-MF with Ray Train V2 (DDP workers on Ray Data shards).

Read top to bottom, in three layers (style.md §6: plain PyTorch, Ray at the edges):

1. **Plain PyTorch, no Ray.** `train_step` (one optimiser step: autocast, named loss terms, clipping),
   `evaluate` (predictions, labels, sample ids and loss sums over some batches), `eval_metrics`,
   `build_optimizer` / `build_scheduler`, `Selector` (best-so-far + early stopping), checkpoint
   `save_checkpoint` / `load_checkpoint`, RNG state capture.
2. **The per-worker loop** `train_fn_per_worker(loop_config)`: `get_dataset_shard`, `prepare_model` (DDP),
   `get_checkpoint` (resume), `report` (a checkpoint every epoch). Validation runs every epoch over the
   **whole** split: `psamf.data` streams all of valid/test to every rank, each rank evaluates a disjoint part
   (a stable hash of the sample id), predictions/labels/ids are gathered from every rank with
   `torch.distributed.all_gather_object`, a sample seen twice or a count different from the manifest's is an
   error, and every rank computes the same metrics from the same gathered arrays (so the scheduler and early
   stopping agree across ranks).
   After the last epoch every rank loads the **selected** checkpoint (validation only) and evaluates valid and
   test once; rank 0 returns the results.
3. **The driver**: `preflight` (every check that can fail before any worker starts), `train(cfg, seeds=...)`
   (one `TorchTrainer.fit` per seed, in parallel where the cluster has room), the run outputs
   (`psamf.outputs`), and the `psamf train` subcommand.

Selection rule. The selected checkpoint is the epoch with the best `optim.select_metric` (validation only) in
`optim.select_mode`; on equal scores the **later** epoch wins and NaN is worst, exactly the order Ray's
`CheckpointConfig(checkpoint_score_attribute=...)` keeps, so the selected checkpoint is always among the
`run.keep_checkpoints` Ray retains. Early stopping counts epochs since the last **strict** improvement.
`val_loss` is the validation L1 as a per-sample mean (the quantity the reference steps its plateau scheduler on);
`val_total`, `val_l1`, `val_ccl`, ... are the loss terms averaged over validation samples (the contrastive terms
depend on batch composition, so they are indicative only).

Checkpoints and resume. Every epoch, rank 0 writes `checkpoint_epoch=NNN/` holding `model.pt` (the unwrapped
state dict), `train_state.pt` (optimizer, scheduler, selector, epoch, history, every rank's RNG states, session
counter), `config.yaml` and `meta.json`. Ray keeps the best `run.keep_checkpoints` by the selection metric **and
always the latest one** (Ray 2.60 `CheckpointManager` never deletes the latest registered checkpoint), so a restart
(`FailureConfig(max_failures)`) or a re-run of the same `run.name` continues from the latest epoch via
`ray.train.get_checkpoint()`; the history travels inside the checkpoint, so no epoch is recorded twice. Every
rank waits after each `report` until the controller has registered it (`get_all_reported_checkpoints()`):
registration is asynchronous, and a worker dying just after `report` returned could otherwise leave the run
snapshot one epoch behind the uploaded checkpoint (seen in testing: the restart retrained that epoch). An
early-stopped or finished run re-run with the same config trains no further epoch and re-evaluates the selected
checkpoint (same numbers); raise `optim.epochs` (or the patience) to continue it. Ray Train local mode
(`run.num_workers=0`, the loop in the driver process, no DDP) neither persists nor restores checkpoints;
`_LocalModeCheckpoints` writes the same directories with the same retention, so such a run resumes too.

Manifest vs config. `model.audio_dim` / `model.visual_dim` are data facts: they are taken from the shards'
manifest (a differing config value is replaced, with a log line). The tokenizers named in `data.*tokenizer`
must be the ones the shards were tokenised with, and their vocabularies must fit `model.vocab_size` /
`model.personality_vocab_size`; `data.dataset` must match the manifest (else the metrics would be the wrong ones).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from psamf import runtime
from psamf.config import Config, ConfigError, OptimConfig
from psamf.losses import compute_losses
from psamf.metrics import compute_metrics
from psamf.model import build_model, model_inputs, param_groups

__all__ = [
    "TrainResult",
    "EvalOutput",
    "Selector",
    "resolve_amp",
    "train_step",
    "evaluate",
    "eval_metrics",
    "build_optimizer",
    "build_scheduler",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "train_fn_per_worker",
    "preflight",
    "init_ray",
    "train",
    "selectable_metrics",
]

log = logging.getLogger("psamf.train")

LOSS_TERMS = ("total", "l1", "ccl", "ps", "clm")
CHECKPOINT_DIR = "checkpoint_epoch={epoch:03d}"
FAULT_ENV = "PSAMF_FAULT_INJECT"  # testing hook: "rank=1,epoch=2,marker=/tmp/x" -> that rank os._exit(1)s once


# =============================================================================================
# 1. Plain PyTorch
# =============================================================================================


def resolve_amp(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for `optim.amp` on `device`: auto = bf16 on CUDA GPUs that support it, else off."""
    device = torch.device(device)
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ConfigError(f"optim.amp must be auto, bf16 or off, got {amp!r}")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_to_device(batch: Mapping[str, Any], device: torch.device | None) -> dict[str, Any]:
    if device is None:
        return dict(batch)
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def batch_ids(batch: Mapping[str, Any]) -> list[str]:
    """Sample ids of a batch: the `sample_id` strings, else the data-set-wide `index` as a string."""
    sid = batch.get("sample_id")
    if sid is not None:
        if isinstance(sid, np.ndarray):
            sid = sid.tolist()
        return [s.decode() if isinstance(s, bytes) else str(s) for s in sid]
    idx = batch.get("index")
    if idx is not None:
        return [str(int(i)) for i in (idx.tolist() if hasattr(idx, "tolist") else idx)]
    raise KeyError("batch has neither 'sample_id' nor 'index': cannot identify samples")


def _float32(obj: Any) -> Any:
    """Cast the floating tensors a loss reads to float32 (losses outside autocast, in full precision)."""
    if isinstance(obj, Tensor):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float32 else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _float32(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if f.name != "hidden_states"})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(_float32(v) for v in obj))
    if isinstance(obj, tuple):
        return tuple(_float32(v) for v in obj)
    return obj


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: nn.Module, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer, cfg: Config, *,
               device: torch.device | None = None, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One optimiser step on one batch. Returns every loss term (unweighted, plus `total`), `grad_norm`
    (before clipping; NaN when clipping is off) and `batch_size`, as floats.

    Forward under autocast when `amp_dtype` is set (bf16: no loss scaling needed); losses in float32;
    `clip_grad_norm_(optim.grad_clip)` over all trainable parameters when grad_clip > 0.
    A non-finite total loss raises FloatingPointError before the optimiser touches the weights.
    """
    device = device or next(model.parameters()).device
    model.train()
    batch = move_to_device(batch, device)
    with _autocast(device, amp_dtype):
        out = model(**model_inputs(batch))
    terms = compute_losses(_float32(out), batch["label"].float(), cfg.loss, cfg.model)
    total = terms["total"]
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite training loss: { {k: float(v.detach()) for k, v in terms.items()} }")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = math.nan
    if cfg.optim.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(_trainable(model), cfg.optim.grad_clip))
    optimizer.step()
    stats = {k: float(v.detach()) for k, v in terms.items()}
    stats["grad_norm"] = grad_norm
    stats["batch_size"] = int(batch["label"].shape[0])
    return stats


@dataclass
class EvalOutput:
    """What `evaluate` saw: one entry per sample, plus loss sums (term x batch size) and the sample count."""

    ids: list[str]
    pred: np.ndarray  # (N,) float32
    label: np.ndarray  # (N,) float32
    loss_sums: dict[str, float] = field(default_factory=dict)
    n: int = 0

    @classmethod
    def merge(cls, parts: Sequence["EvalOutput"]) -> "EvalOutput":
        """Concatenate parts (e.g. one per rank), sorted by sample id. Raises on a sample seen twice."""
        ids = [i for p in parts for i in p.ids]
        pred = np.concatenate([p.pred for p in parts]) if parts else np.zeros(0, np.float32)
        label = np.concatenate([p.label for p in parts]) if parts else np.zeros(0, np.float32)
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = [i for i in ids if i in seen or seen.add(i)]
            raise RuntimeError(f"evaluation saw {len(dup)} sample(s) more than once (e.g. {dup[:5]}): "
                               "the evaluation split was not partitioned across workers")
        order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
        sums: dict[str, float] = {}
        for p in parts:
            for k, v in p.loss_sums.items():
                sums[k] = sums.get(k, 0.0) + v
        return cls(ids=[ids[i] for i in order], pred=pred[order], label=label[order], loss_sums=sums,
                   n=sum(p.n for p in parts))


def _subset(batch: Mapping[str, Any], keep: np.ndarray) -> dict[str, Any]:
    idx = torch.as_tensor(np.nonzero(keep)[0])
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == keep.shape[0]:
            out[k] = v.index_select(0, idx.to(v.device))
        elif isinstance(v, (list, tuple, np.ndarray)) and len(v) == keep.shape[0]:
            out[k] = [v[i] for i in idx.tolist()]
        else:
            out[k] = v
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Any]], cfg: Config, *,
             device: torch.device | None = None, amp_dtype: torch.dtype | None = None,
             keep: Callable[[list[str]], np.ndarray] | None = None, losses: bool = True) -> EvalOutput:
    """Predict every sample of `batches` in eval mode.

    `keep(ids) -> bool mask` evaluates only the selected rows of each batch (used to partition an unsplit
    split across ranks). Pass the unwrapped model (not DDP): evaluation must not run DDP's collectives.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids: list[str] = []
    preds: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    sums: dict[str, float] = {}
    n = 0
    try:
        for batch in batches:
            bid = batch_ids(batch)
            if keep is not None:
                mask = np.asarray(keep(bid), dtype=bool)
                if not mask.any():
                    continue
                if not mask.all():
                    batch = _subset(batch, mask)
                    bid = [b for b, m in zip(bid, mask) if m]
            batch = move_to_device(batch, device)
            with _autocast(device, amp_dtype):
                out = model(**model_inputs(batch))
            out = _float32(out)
            B = int(batch["label"].shape[0])
            if losses:
                for k, v in compute_losses(out, batch["label"].float(), cfg.loss, cfg.model).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * B
            ids += bid
            preds.append(out.prediction.detach().float().cpu().numpy().reshape(-1))
            labels.append(batch["label"].detach().float().cpu().numpy().reshape(-1))
            n += B
    finally:
        model.train(was_training)
    return EvalOutput(ids=ids, pred=np.concatenate(preds) if preds else np.zeros(0, np.float32),
                      label=np.concatenate(labels) if labels else np.zeros(0, np.float32), loss_sums=sums, n=n)


def eval_metrics(out: EvalOutput, dataset: str, prefix: str = "val_") -> dict[str, float]:
    """Metrics of a (merged) evaluation: the dataset's metrics, each loss term's per-sample mean, and
    `<prefix>loss` = per-sample mean L1 (= MAE, the reference's plateau quantity)."""
    if out.n == 0:
        raise RuntimeError("evaluation saw no samples")
    m = {f"{prefix}{k}": (int(v) if k in ("n", "n_non0") else float(v))
         for k, v in compute_metrics(out.pred, out.label, dataset).items()}
    for k, v in out.loss_sums.items():
        m[f"{prefix}{k}"] = v / out.n
    m[f"{prefix}loss"] = float(np.mean(np.abs(out.pred.astype(np.float64) - out.label.astype(np.float64))))
    return m


def selectable_metrics(dataset: str) -> list[str]:
    """Every validation key `optim.select_metric` may name for this data set."""
    rng = np.random.default_rng(0)
    keys = compute_metrics(rng.uniform(-1, 1, 8), rng.uniform(-1, 1, 8), dataset).keys()
    return sorted({"val_loss", *(f"val_{t}" for t in LOSS_TERMS), *(f"val_{k}" for k in keys)}
                  - {"val_n", "val_n_non0"})


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Adam:
    """Adam with two groups (psamf.model.param_groups): the sentiment BERT at lr_bert, the rest at lr_main.
    Coupled L2 weight decay, as the reference's Adam."""
    groups = [g for g in param_groups(model, optim) if g["params"]]
    return torch.optim.Adam(groups)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig):
    """ReduceLROnPlateau on the validation loss (min), stepped once per epoch (reference `--when`)."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=optim.plateau_factor,
                                                      patience=optim.plateau_patience)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {f"lr_{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


@dataclass
class Selector:
    """Best-so-far on a validation metric + early stopping. See the module docstring for the rule."""

    metric: str
    mode: str = "min"
    patience: int | None = None
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

    def _key(self, v: float | None) -> tuple[bool, float]:
        # Ray's _get_checkpoint_score: (not is_nan, +score for max / -score for min); NaN ties among themselves
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return (False, 0.0)
        return (True, float(v) if self.mode == "max" else -float(v))

    def update(self, epoch: int, value: float) -> bool:
        """Record an epoch's score. Returns True when it becomes the selected (best) epoch."""
        value = float(value) if value is not None else math.nan
        first = self.best_epoch is None
        strict = first or self._key(value) > self._key(self.best)
        is_best = first or self._key(value) >= self._key(self.best)  # ties: the later epoch, as Ray keeps
        if is_best:
            self.best, self.best_epoch = value, epoch
        self.bad_epochs = 0 if strict else self.bad_epochs + 1
        return is_best

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("metric") != self.metric or state.get("mode") != self.mode:
            raise ConfigError(f"optim.select_metric/select_mode ({self.metric}, {self.mode}) differ from the run "
                              f"being resumed ({state.get('metric')}, {state.get('mode')}): selection would be "
                              "inconsistent with the checkpoints Ray kept; use a new run.name")
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
        self.bad_epochs = int(state.get("bad_epochs", 0))


# ---- RNG ----------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- checkpoints ----------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    selector: Selector, epoch: int, history: Sequence[Mapping[str, Any]], cfg: Config,
                    rng_states: Sequence[Mapping[str, Any]] | None = None, session: int = 0,
                    metrics: Mapping[str, Any] | None = None) -> None:
    """Write a checkpoint directory: model.pt (unwrapped state dict), train_state.pt, config.yaml, meta.json."""
    from psamf import __version__

    os.makedirs(path, exist_ok=True)
    torch.save(_unwrap(model).state_dict(), os.path.join(path, "model.pt"))
    torch.save({
        "epoch": int(epoch),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "selector": selector.state_dict(),
        "history": json.dumps(list(history)),  # a string: weights_only loading, NaN kept
        "rng": list(rng_states or []),
        "session": int(session),
    }, os.path.join(path, "train_state.pt"))
    cfg.to_yaml(os.path.join(path, "config.yaml"))
    meta = {"epoch": int(epoch), "psamf_version": __version__, "select_metric": selector.metric,
            "select_mode": selector.mode, "best_epoch": selector.best_epoch, "session": int(session),
            "metrics": dict(metrics or {})}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)


@contextlib.contextmanager
def local_checkpoint(checkpoint: Any) -> Iterator[str]:
    """A local directory holding a Ray `Checkpoint`'s files, private to this process.

    A checkpoint on the local filesystem is read in place. A remote one (`s3://`, `gs://`) is downloaded into a
    fresh temporary directory that is removed afterwards. Ray's own `Checkpoint.as_directory()` is not safe here:
    every process on a node that opens the same checkpoint shares one temporary directory, and a process that
    arrives after the first download has finished downloads again into that directory while the others are
    reading it (Ray 2.60 `Checkpoint.to_directory`: the download lock is only held during a download). Two DDP
    ranks restoring from S3 then read half-rewritten files: "PytorchStreamReader failed reading file".
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    d = tempfile.mkdtemp(prefix=f"psamf-ckpt-{os.getpid()}-")
    try:
        checkpoint.to_directory(d)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def load_model_weights(path: str, model: nn.Module) -> None:
    """Load a checkpoint directory's model.pt into `model` (unwrapped or DDP), strictly."""
    state = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    _unwrap(model).load_state_dict(state)


def load_checkpoint(path: str, *, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, selector: Selector | None = None) -> dict[str, Any]:
    """Restore whatever is given from a checkpoint directory. Returns the train state
    (`epoch`, `history` as a list, `rng`, `session`, ...)."""
    if model is not None:
        load_model_weights(path, model)
    state = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if selector is not None:
        selector.load_state_dict(state["selector"])
    state["history"] = json.loads(state["history"])
    return state


def checkpoint_config(path: str) -> Config:
    return Config.from_yaml(os.path.join(path, "config.yaml"))


# =============================================================================================
# Distributed helpers (torch.distributed only; inert in a single process)
# =============================================================================================


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_gather(obj: Any) -> list[Any]:
    """`all_gather_object` from every rank (a one-element list in a single process)."""
    if not _dist_ready():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_eval(part: EvalOutput) -> EvalOutput:
    """Every rank's evaluation part, merged (and checked for duplicates) on every rank."""
    return EvalOutput.merge(all_gather(part))


def _partition(rank: int, world: int) -> Callable[[list[str]], np.ndarray]:
    """Rows this rank evaluates when every rank iterates the same, unsplit split: a stable hash of the id."""
    import zlib

    def keep(ids: list[str]) -> np.ndarray:
        return np.fromiter(((zlib.crc32(i.encode()) % world) == rank for i in ids), dtype=bool, count=len(ids))

    return keep


# =============================================================================================
# Data adapter (psamf.data)
# =============================================================================================


def _iter(shard: Any, cfg: Config, batch_size: int, *, epoch: int, train: bool) -> Iterable[Mapping[str, Any]]:
    from psamf import data

    return data.iter_batches(shard, cfg.data, batch_size, epoch=epoch, train=train)


def timed_batches(batches: Iterable[Any]) -> Iterator[tuple[Any, float]]:
    """Yield (batch, seconds spent waiting for it): the data-wait measure of the training loop and the benchmarks."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t0


def _split_eval_across_workers() -> bool:
    """Whether psamf.data splits valid/test across workers (else every rank sees the whole split)."""
    from psamf import data

    return bool(getattr(data, "EVAL_SPLIT_ACROSS_WORKERS", False))


def _ray_data_config():
    from psamf import data

    if hasattr(data, "split_config"):
        return data.split_config()
    import ray.train

    return ray.train.DataConfig(datasets_to_split=["train"])


# =============================================================================================
# 2. The Ray Train per-worker loop
# =============================================================================================


def _maybe_fault(spec: Mapping[str, Any] | None, rank: int, epoch: int) -> None:
    """Testing hook: the named rank exits hard once at the named epoch (marker file makes it once)."""
    if not spec or int(spec["rank"]) != rank or int(spec["epoch"]) != epoch:
        return
    marker = spec["marker"]
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"rank {rank} exited at epoch {epoch}, pid {os.getpid()}\n")
    log.warning("fault injection: rank %d exits at epoch %d", rank, epoch)
    os._exit(1)


class _LocalModeCheckpoints:
    """Checkpoints for Ray Train local mode (`run.num_workers=0`), which neither persists nor restores them.

    Same layout as Ray's: `<run dir>/checkpoint_epoch=NNN/` with the files of `save_checkpoint`, meta.json
    copied last (a directory without it is an interrupted copy and is ignored). Keeps the latest and the best
    `run.keep_checkpoints` by the selection metric, as Ray does, so re-running the run name resumes here too."""

    def __init__(self, storage: Sequence[Any], name: str, keep: int, selector: Selector):
        from psamf.outputs import storage_target

        st = storage_target(storage[0], storage[1])
        self.fs, self.run_dir, self.keep, self.selector = st.fs, st.run_dir(name), keep, selector

    def complete(self) -> dict[int, str]:
        import re

        import pyarrow.fs as pafs

        out = {}
        for info in self.fs.get_file_info(pafs.FileSelector(self.run_dir, allow_not_found=True)):
            m = re.fullmatch(r"checkpoint_epoch=(\d+)", info.base_name)
            if m and info.type == pafs.FileType.Directory and \
                    self.fs.get_file_info(f"{info.path}/meta.json").type == pafs.FileType.File:
                out[int(m.group(1))] = info.path
        return out

    def latest(self) -> Any:
        """The latest complete checkpoint as a `ray.train.Checkpoint`, or None."""
        import ray.train

        done = self.complete()
        return ray.train.Checkpoint(done[max(done)], filesystem=self.fs) if done else None

    def save(self, local_dir: str, epoch: int, history: Sequence[Mapping[str, Any]]) -> None:
        import pyarrow.fs as pafs

        dest = f"{self.run_dir}/{CHECKPOINT_DIR.format(epoch=epoch)}"
        self.fs.create_dir(dest)
        for name in sorted(os.listdir(local_dir), key=lambda n: n == "meta.json"):  # meta.json last
            pafs.copy_files(os.path.join(local_dir, name), f"{dest}/{name}",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        score = {int(r["epoch"]): r.get(self.selector.metric) for r in history}
        done = self.complete()
        ranked = sorted((e for e in done if isinstance(score.get(e), (int, float)) and math.isfinite(score[e])),
                        key=lambda e: (score[e] if self.selector.mode == "min" else -score[e], -e))
        for e in set(done) - set(ranked[:self.keep]) - {max(done)}:
            self.fs.delete_dir(done[e])

    def path(self, epoch: int | None) -> str | None:
        return self.complete().get(epoch) if epoch is not None else None


def _device() -> torch.device:
    import ray.train.torch

    dev = ray.train.torch.get_device()
    return dev[0] if isinstance(dev, list) else dev


def train_fn_per_worker(loop_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function. `loop_config`: {"config": Config dict, "counts": {split: n}, "fault": ...,
    "max_steps": int|None (benchmarks), "storage": (storage_path, s3_endpoint) for rank 0's progress files}."""
    import ray.train
    import ray.train.torch

    t_fn = time.perf_counter()
    cfg = Config.from_dict(loop_config["config"], source="train_loop_config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_mode = cfg.run.num_workers == 0
    device = _device()
    amp_dtype = resolve_amp(cfg.optim.amp, device)
    max_steps = loop_config.get("max_steps")
    counts = loop_config.get("counts") or {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # ---- model (same init on every rank; DDP broadcasts rank 0's anyway) ----
    seed_everything(cfg.optim.seed)
    raw = build_model(cfg.model)
    selector = Selector(cfg.optim.select_metric, cfg.optim.select_mode, cfg.optim.early_stop_patience)
    history: list[dict[str, Any]] = []
    start_epoch, session, resumed_from, restore = 0, 0, None, None
    local_ckpts = (_LocalModeCheckpoints(loop_config["storage"], cfg.run.name, cfg.run.keep_checkpoints, selector)
                   if local_mode and loop_config.get("storage") else None)
    ckpt = ray.train.get_checkpoint() or (local_ckpts.latest() if local_ckpts is not None else None)
    if ckpt is not None:
        with local_checkpoint(ckpt) as d:
            load_model_weights(d, raw)
            restore = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=True)
        start_epoch = int(restore["epoch"]) + 1
        resumed_from = int(restore["epoch"])
        session = int(restore.get("session", 0)) + 1
        history = json.loads(restore["history"])
        selector.load_state_dict(restore["selector"])
    model = ray.train.torch.prepare_model(raw)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    if restore is not None:
        optimizer.load_state_dict(restore["optimizer"])
        if restore.get("scheduler") is not None:
            scheduler.load_state_dict(restore["scheduler"])
        rngs = restore.get("rng") or []
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        else:  # different world size: fresh per-rank streams, deterministic in (seed, epoch, rank)
            seed_everything(cfg.optim.seed + 1000 * start_epoch + rank)
        if rank == 0:
            log.info("resumed %s from epoch %d (session %d)", cfg.run.name, resumed_from, session)
    else:
        seed_everything(cfg.optim.seed + rank)  # per-rank dropout streams

    train_shard = ray.train.get_dataset_shard("train")
    eval_shards = {s: ray.train.get_dataset_shard(s) for s in ("valid", "test")}
    split_eval = _split_eval_across_workers()
    keep = None if (split_eval or world == 1) else _partition(rank, world)
    progress = _Progress(loop_config.get("storage"), cfg.run.name) if rank == 0 else None
    best_state = None  # local mode only: the best weights in memory (its checkpoints are written by _LocalModeCheckpoints)

    def run_eval(split: str) -> EvalOutput:
        out = gather_eval(evaluate(raw, _iter(eval_shards[split], cfg, cfg.optim.batch_size, epoch=0, train=False),
                                   cfg, device=device, amp_dtype=amp_dtype, keep=keep))
        expected = counts.get(split)
        if expected is not None and out.n != expected:
            raise RuntimeError(f"{split}: evaluated {out.n} samples across {world} worker(s), the split has "
                               f"{expected}: samples were dropped")
        return out

    if rank == 0:
        log.info("worker setup (model, optimizer, resume) took %.1f s; training epochs %d..%d",
                 time.perf_counter() - t_fn, start_epoch, cfg.optim.epochs - 1)
    for epoch in range(start_epoch, cfg.optim.epochs):
        if selector.should_stop:
            break
        # ---- train ----
        model.train()
        t_epoch = time.perf_counter()
        wait = compute = 0.0
        sums: dict[str, float] = {}
        n_samples = steps = 0
        grad_norms = []
        for batch, waited in timed_batches(_iter(train_shard, cfg, cfg.optim.batch_size, epoch=epoch, train=True)):
            t1 = time.perf_counter()
            try:
                stats = train_step(model, batch, optimizer, cfg, device=device, amp_dtype=amp_dtype)
            except FloatingPointError as e:
                raise FloatingPointError(f"epoch {epoch}, step {steps}, rank {rank}: {e}") from None
            compute += time.perf_counter() - t1
            wait += waited
            B = stats.pop("batch_size")
            grad_norms.append(stats.pop("grad_norm"))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * B
            n_samples += B
            steps += 1
            if steps == 1:
                _maybe_fault(loop_config.get("fault"), rank, epoch)
            if max_steps is not None and steps >= max_steps:
                break
        time_train = time.perf_counter() - t_epoch
        parts = all_gather({"sums": sums, "n": n_samples, "steps": steps, "wait": wait, "compute": compute,
                            "time": time_train})
        n_all = sum(p["n"] for p in parts)
        if n_all == 0:
            raise RuntimeError(f"epoch {epoch}: no training batch on any worker (train split too small for "
                               f"batch_size={cfg.optim.batch_size} x {world} workers?)")
        rec: dict[str, Any] = {"epoch": epoch}
        for k in sums:
            rec[f"train_{k}"] = sum(p["sums"].get(k, 0.0) for p in parts) / n_all
        rec["train_samples"] = n_all
        rec["train_steps"] = max(p["steps"] for p in parts)
        finite = [g for g in grad_norms if math.isfinite(g)]
        rec["grad_norm"] = float(np.mean(finite)) if finite else math.nan
        rec["samples_per_s_per_worker"] = float(np.mean([p["n"] / p["time"] for p in parts if p["time"] > 0]))
        tot = sum(p["wait"] + p["compute"] for p in parts)
        rec["data_wait_frac"] = sum(p["wait"] for p in parts) / tot if tot > 0 else math.nan
        rec["time_train_s"] = max(p["time"] for p in parts)
        rec.update(group_lrs(optimizer))

        # ---- validate (whole split, every rank gets the same numbers) ----
        t_eval = time.perf_counter()
        val = run_eval("valid")
        rec.update(eval_metrics(val, cfg.data.dataset, "val_"))
        rec["time_eval_s"] = time.perf_counter() - t_eval
        rec.update({"world_size": world, "session": session, "resumed_from": resumed_from})
        if cfg.optim.select_metric not in rec:
            raise ConfigError(f"optim.select_metric={cfg.optim.select_metric!r} is not among the validation "
                              f"metrics {sorted(k for k in rec if k.startswith('val_'))}")
        scheduler.step(rec["val_loss"])
        is_best = selector.update(epoch, rec[cfg.optim.select_metric])
        rec["is_best"] = is_best
        rec["best_epoch"] = selector.best_epoch
        history.append(rec)
        if local_mode and is_best:
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in raw.state_dict().items()})

        # ---- checkpoint (rank 0 writes, every rank reports: it is a collective) ----
        rngs = all_gather(rng_state())
        with tempfile.TemporaryDirectory(prefix="psamf-ckpt-") as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(tmp, model=raw, optimizer=optimizer, scheduler=scheduler, selector=selector,
                                epoch=epoch, history=history, cfg=cfg, rng_states=rngs, session=session,
                                metrics=rec)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if local_ckpts is not None:
                    local_ckpts.save(tmp, epoch, history)
            ray.train.report(_report_metrics(rec), checkpoint=checkpoint,
                             checkpoint_dir_name=CHECKPOINT_DIR.format(epoch=epoch))
        if not local_mode:
            # The controller registers a report asynchronously: a worker dying right after `report` returned
            # could lose the registration (the upload is there, the run snapshot does not name it), and the
            # restart would then retrain this epoch. Wait until it is registered and in the snapshot.
            ray.train.get_all_reported_checkpoints()
        if progress is not None:
            progress.write(history)
        if rank == 0:
            log.info("epoch %d (%.1f s): %s", epoch, time.perf_counter() - t_epoch,
                     _fmt_record(rec, cfg.optim.select_metric))
        if selector.should_stop:
            if rank == 0:
                log.info("early stop after epoch %d: no strict improvement of %s for %d epochs (best epoch %s)",
                         epoch, selector.metric, selector.bad_epochs, selector.best_epoch)
            break

    if selector.best_epoch is None:
        raise RuntimeError("no epoch was trained (optim.epochs reached before any epoch?)")

    # ---- the selected checkpoint: evaluate valid and test once ----
    checkpoint_path = None
    if local_mode:
        checkpoint_path = local_ckpts.path(selector.best_epoch) if local_ckpts is not None else None
        if best_state is not None:
            raw.load_state_dict(best_state)
        elif checkpoint_path:  # the best epoch is from an earlier session
            with local_checkpoint(ray.train.Checkpoint(checkpoint_path, filesystem=local_ckpts.fs)) as d:
                load_model_weights(d, raw)
    else:
        selected = [r for r in ray.train.get_all_reported_checkpoints()
                    if int(r.metrics.get("epoch", -1)) == selector.best_epoch]
        if not selected:
            raise RuntimeError(f"the checkpoint of the selected epoch {selector.best_epoch} is not among the "
                               "checkpoints Ray kept")
        ck = selected[-1].checkpoint
        checkpoint_path = ck.path
        with local_checkpoint(ck) as d:
            load_model_weights(d, raw)
    t_final = time.perf_counter()
    final_val = run_eval("valid")
    final_test = run_eval("test")
    if rank == 0:
        log.info("selected epoch %d: valid + test evaluated in %.1f s (worker total %.1f s)", selector.best_epoch,
                 time.perf_counter() - t_final, time.perf_counter() - t_fn)
    if rank != 0:
        return None
    return {
        "history": history,
        "selected_epoch": selector.best_epoch,
        "selector": selector.state_dict(),
        "early_stopped": selector.should_stop,
        "checkpoint_path": checkpoint_path,
        "world_size": world,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "device": str(device),
        "valid": {"ids": final_val.ids, "pred": final_val.pred.tolist(), "label": final_val.label.tolist(),
                  "metrics": eval_metrics(final_val, cfg.data.dataset, "")},
        "test": {"ids": final_test.ids, "pred": final_test.pred.tolist(), "label": final_test.label.tolist(),
                 "metrics": eval_metrics(final_test, cfg.data.dataset, "")},
    }


def _report_metrics(rec: Mapping[str, Any]) -> dict[str, Any]:
    """What Ray records per checkpoint (numbers only; None kept out of the score attribute)."""
    return {k: v for k, v in rec.items() if v is not None}


def _fmt_record(rec: Mapping[str, Any], select: str) -> str:
    keys = ["train_total", "val_loss", "val_mae", "val_corr", "val_acc2_non0", select, "lr_bert", "lr_main",
            "samples_per_s_per_worker", "data_wait_frac"]
    seen, parts = set(), []
    for k in keys:
        if k in rec and k not in seen and isinstance(rec[k], (int, float)):
            seen.add(k)
            parts.append(f"{k}={rec[k]:.4g}")
    return " ".join(parts) + (" *best*" if rec.get("is_best") else "")


class _Progress:
    """Rank 0's live files in the run directory: history.json and TensorBoard events (best effort)."""

    def __init__(self, storage: Sequence[Any] | None, name: str):
        self.target = None
        if storage:
            from psamf.outputs import storage_target

            st = storage_target(storage[0], storage[1])
            self.target = (st.fs, st.run_dir(name))

    def write(self, history: Sequence[Mapping[str, Any]]) -> None:
        if self.target is None:
            return
        from psamf.outputs import write_history, write_tensorboard

        fs, run_dir = self.target
        try:
            write_history(fs, run_dir, history)
            write_tensorboard(fs, run_dir, history)
        except Exception as e:  # noqa: BLE001 - progress files must never kill training
            log.warning("could not write progress files to %s: %s", run_dir, e)


class _HistoryPrinter:
    """The driver's view of a run on a quiet embedded Ray (`runtime.quiet()`): worker logs are not streamed, so
    a background thread polls the run's history.json (written by rank 0 after each epoch) and prints every new
    epoch. Epochs already in the file when it starts (a resumed run) are not printed again."""

    def __init__(self, fs: Any, run_dir: str, select: str, interval_s: float = 1.0, out: Any = None):
        import threading

        self.fs, self.path, self.select, self.interval_s = fs, f"{run_dir}/history.json", select, interval_s
        self.name = run_dir.rstrip("/").rsplit("/", 1)[-1]
        self.out = out if out is not None else sys.stdout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="psamf-history-printer", daemon=True)
        self.seen = len(self._read())

    def _read(self) -> list[dict[str, Any]]:
        from psamf.outputs import read_json

        try:
            hist = read_json(self.fs, self.path)
        except Exception:  # noqa: BLE001 - not written yet, or being replaced: try again next poll
            return []
        return hist if isinstance(hist, list) else []

    def poll(self) -> None:
        hist = self._read()
        for rec in hist[self.seen:]:
            print(f"  [{self.name}] epoch {rec.get('epoch')} ({rec.get('time_train_s', math.nan):.1f} s train): "
                  f"{_fmt_record(rec, self.select)}", file=self.out, flush=True)
        self.seen = max(self.seen, len(hist))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> "_HistoryPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()


# =============================================================================================
# 3. The driver
# =============================================================================================


@dataclass
class TrainResult:
    """What `train` returns.

    One run: `run_dir` (URI), `metrics` (the content of metrics.json), `paths` (metrics, predictions, curves,
    tensorboard, history, config, checkpoint), `history` (one record per epoch), `table` (valid and test metrics
    side by side). Several seeds: `seeds` holds one such result per seed, `summary` the mean and population std
    of each test metric, `table` the `format_table` text, `paths["summary"]` the JSON summary."""

    run_name: str
    run_dir: str  # URI of the run directory
    metrics: dict[str, Any]  # metrics.json
    paths: dict[str, str]  # metrics, predictions, config, curves, tensorboard, history, checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)
    seeds: list["TrainResult"] = field(default_factory=list)
    summary: dict[str, tuple[float, float]] | None = None
    table: str | None = None


@dataclass
class Preflight:
    cfg: Config  # with the manifest's feature dims
    manifest: dict[str, Any]
    storage: Any  # psamf.outputs.RunStorage


def _read_manifest(uri: str, endpoint: str | None) -> dict[str, Any]:
    from psamf import data

    try:
        return data.read_manifest(uri, s3_endpoint=endpoint)
    except ConfigError:
        raise
    except FileNotFoundError as e:
        raise ConfigError(f"data.uri={uri!r}: no prepared shards there ({e}); run `psamf prepare` first") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.uri={uri!r}: cannot read the shard manifest: {e}") from None


def preflight(cfg: Config, *, check_resources: bool = True, manifest: Mapping[str, Any] | None = None) -> Preflight:
    """Every check that can fail before any Ray worker starts. Returns the config with the manifest's feature
    dims. Raises ConfigError with a message naming the field."""
    from psamf.outputs import exists, read_bytes, storage_target

    o = cfg.optim
    valid_keys = selectable_metrics(cfg.data.dataset)
    if o.select_metric not in valid_keys:
        raise ConfigError(f"optim.select_metric={o.select_metric!r} is not a validation metric of "
                          f"data.dataset={cfg.data.dataset!r}; choose one of {valid_keys}")
    lower_better = o.select_metric in ("val_loss", "val_mae") or o.select_metric in (f"val_{t}" for t in LOSS_TERMS)
    if (o.select_mode == "max") == lower_better:
        log.warning("optim.select_mode=%s with select_metric=%s: is that intended?", o.select_mode, o.select_metric)

    man = dict(manifest) if manifest is not None else _read_manifest(cfg.data.uri, cfg.data.s3_endpoint)
    # --- data set identity ---
    mds = man.get("dataset")
    if mds and cfg.data.dataset != "custom" and mds != cfg.data.dataset:
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} but the shards at {cfg.data.uri} hold {mds!r}: "
                          "the metrics (and the preset's dims) would be the wrong ones")
    # --- feature dims: the manifest is authoritative ---
    dims = man.get("feature_dims") or {}
    d = cfg.to_dict()
    for key, name in (("audio", "audio_dim"), ("visual", "visual_dim")):
        if key in dims and int(dims[key]) != d["model"][name]:
            log.info("model.%s: %d -> %d (from the shards' manifest)", name, d["model"][name], int(dims[key]))
            d["model"][name] = int(dims[key])
    # --- tokenizers ---
    toks = man.get("tokenizers") or {}
    for key, field_name, vocab_field in (("text", "tokenizer", "vocab_size"),
                                         ("personality", "personality_tokenizer", "personality_vocab_size")):
        t = toks.get(key)
        if not t:
            continue
        want = getattr(cfg.data, field_name)
        if t.get("name") and t["name"] != want:
            raise ConfigError(f"data.{field_name}={want!r} but the shards were tokenised with {t['name']!r}; set "
                              f"data.{field_name}={t['name']} or re-run `psamf prepare`")
        if key == "personality" and not cfg.model.use_personality:
            continue
        vs = t.get("vocab_size")
        model_vs = d["model"][vocab_field]
        if vs is not None and int(vs) > model_vs and not (key == "text" and cfg.model.text_model) \
                and not (key == "personality" and cfg.model.personality_model):
            raise ConfigError(f"model.{vocab_field}={model_vs} is smaller than the {key} tokenizer's vocabulary "
                              f"({vs} tokens, {t.get('name')}): token ids would index past the embedding table; "
                              f"set model.{vocab_field}={vs}")
        L = t.get("max_len")
        if L is not None and int(L) > cfg.model.max_position_embeddings and key == "text":
            raise ConfigError(f"the shards' text length ({L}) exceeds model.max_position_embeddings "
                              f"({cfg.model.max_position_embeddings})")
    # --- precomputed personality CLS width ---
    pc = man.get("personality_cls")
    if pc and cfg.data.use_precomputed_personality and cfg.model.use_personality and not cfg.model.personality_model:
        width = int(pc.get("dim", cfg.model.hidden_size))
        if width != cfg.model.hidden_size and cfg.model.personality_tokens:
            raise ConfigError(f"the shards' precomputed personality_cls has width {width} but "
                              f"model.personality_tokens needs model.hidden_size ({cfg.model.hidden_size}); set "
                              "data.use_precomputed_personality=false or re-run prepare with this model")
    # --- split sizes ---
    counts = man.get("counts") or {}
    for s in ("train", "valid", "test"):
        if int(counts.get(s, 0)) <= 0:
            raise ConfigError(f"the shards at {cfg.data.uri} have no {s!r} split ({counts})")
    workers = max(1, cfg.run.num_workers)
    if int(counts["train"]) < o.batch_size * workers:
        raise ConfigError(f"train split has {counts['train']} samples: fewer than optim.batch_size "
                          f"({o.batch_size}) x run.num_workers ({workers}); no full batch per worker")
    try:
        new = Config.from_dict(d, source="config (with manifest dims)")
    except ConfigError:
        raise
    new.preset = cfg.preset
    # --- storage and resume compatibility ---
    storage = storage_target(new.run.storage_path, new.run.s3_endpoint or new.data.s3_endpoint)
    run_dir = storage.run_dir(new.run.name)
    try:
        old_cfg_path = f"{run_dir}/config.yaml"
        if exists(storage.fs, old_cfg_path):
            import yaml

            old = Config.from_dict(yaml.safe_load(read_bytes(storage.fs, old_cfg_path)) or {}, source=old_cfg_path)
            _check_resume_compatible(old, new)
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"run.storage_path={new.run.storage_path!r}: cannot access {storage.run_uri(new.run.name)}"
                          f": {e}") from None
    if check_resources:
        _check_resources(new)
    return Preflight(cfg=new, manifest=man, storage=storage)


def _check_resume_compatible(old: Config, new: Config) -> None:
    """A re-used run name resumes: the model, loss and data must be those of the checkpoints."""
    diffs = []
    od, nd = old.to_dict(), new.to_dict()
    for sec in ("model", "loss"):
        diffs += [f"{sec}.{k}: {od[sec][k]!r} -> {nd[sec][k]!r}" for k in nd[sec] if od[sec].get(k) != nd[sec][k]]
    for k in ("uri", "dataset", "tokenizer", "personality_tokenizer", "max_text_len"):
        if od["data"].get(k) != nd["data"][k]:
            diffs.append(f"data.{k}: {od['data'].get(k)!r} -> {nd['data'][k]!r}")
    for k in ("select_metric", "select_mode", "seed"):
        if od["optim"].get(k) != nd["optim"][k]:
            diffs.append(f"optim.{k}: {od['optim'].get(k)!r} -> {nd['optim'][k]!r}")
    if diffs:
        raise ConfigError(f"run.name={new.run.name!r} already exists under {new.run.storage_path} with a different "
                          f"configuration; re-using a name resumes that run. Differences: {'; '.join(diffs)}. "
                          "Choose a new run.name (or delete the old run directory).")


def _check_resources(cfg: Config) -> None:
    import ray

    if not ray.is_initialized():
        return
    res = ray.cluster_resources()
    need_cpu = max(1, cfg.run.num_workers) * cfg.run.cpus_per_worker
    if cfg.run.use_gpu and res.get("GPU", 0) < max(1, cfg.run.num_workers) * cfg.run.gpus_per_worker:
        msg = (f"run.use_gpu=true with {cfg.run.num_workers} worker(s) x {cfg.run.gpus_per_worker} GPU, but the "
               f"cluster has {res.get('GPU', 0)} GPU(s)")
        if _embedded():
            raise ConfigError(msg + " (embedded local Ray: set run.use_gpu=false)")
        log.warning("%s: waiting for the autoscaler", msg)
    if res.get("CPU", 0) < need_cpu + 1:
        msg = (f"the workers reserve {need_cpu:g} CPU(s) and the cluster has {res.get('CPU', 0):g}: Ray Data read "
               "tasks would starve (ray-notes §3.3); lower run.cpus_per_worker or run.num_workers")
        if _embedded():
            raise ConfigError(msg)
        log.warning("%s (unless the autoscaler adds nodes)", msg)


def _embedded() -> bool:
    return runtime.embedded()


init_ray = runtime.init_ray  # re-exported: psamf.train.init_ray is public API


def _fault_spec() -> dict[str, Any] | None:
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    spec = dict(kv.split("=", 1) for kv in raw.split(","))
    return {"rank": int(spec["rank"]), "epoch": int(spec["epoch"]), "marker": spec["marker"]}


def build_trainer(pf: Preflight, *, datasets: Mapping[str, Any] | None = None, max_steps: int | None = None,
                  fault: Mapping[str, Any] | None = None, callbacks: Sequence[Any] = ()):
    """The TorchTrainer for one run (one seed). `callbacks` go to `ray.train.RunConfig(callbacks=...)` (Tune passes
    its `TuneReportCallback` here so that every epoch's validation metrics reach the scheduler)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg, st = pf.cfg, pf.storage
    if datasets is None:
        datasets = load_datasets(cfg.data, pf.manifest)
    res = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        res["GPU"] = cfg.run.gpus_per_worker
    scaling = ray.train.ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                      resources_per_worker=res)
    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=st.storage_path,
        storage_filesystem=st.storage_filesystem,
        callbacks=list(callbacks),
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                                     checkpoint_score_attribute=cfg.optim.select_metric,
                                                     checkpoint_score_order=cfg.optim.select_mode),
    )
    loop_config = {
        "config": cfg.to_dict(),
        "counts": {s: int(n) for s, n in (pf.manifest.get("counts") or {}).items()},
        "fault": dict(fault) if fault else _fault_spec(),
        "max_steps": max_steps,
        "storage": (cfg.run.storage_path if "://" in cfg.run.storage_path else st.root,
                    cfg.run.s3_endpoint or cfg.data.s3_endpoint),
    }
    return TorchTrainer(train_fn_per_worker, train_loop_config=loop_config, datasets=dict(datasets),
                        dataset_config=_ray_data_config(), scaling_config=scaling, run_config=run_config)


DRIVER_LOAD_FRACTION = 0.2  # of the object store: splits up to this size are read by the driver (load_datasets)


def load_datasets(data_cfg: Any, manifest: Mapping[str, Any],
                  splits: Sequence[str] = ("train", "valid", "test")) -> dict[str, Any]:
    """The Ray datasets of a run: `psamf.data.build_datasets`, with a fast path for small splits.

    With `data.materialize` (read each split into the object store once), a split is materialised by
    `build_datasets` with one round of Ray Data read tasks, which costs seconds per split even for a few MiB
    (about 10 s per split on the loaded 2-core test machine: docs/benchmarks.md, "Training throughput"). Splits
    that together fit in DRIVER_LOAD_FRACTION of the object store are instead read here, in the driver, with
    pyarrow (same shard list, same pruned columns) and handed over with `ray.data.from_arrow`: the same
    materialised blocks, no tasks. Train keeps the per-pass randomised block order `build_datasets` gives a
    materialised train split; evaluation splits keep shard order. Larger splits (or `data.materialize=false`)
    go through `build_datasets` unchanged."""
    import pyarrow.parquet as pq
    import ray

    from psamf import data
    from psamf.outputs import storage_target

    def size(names: Sequence[str]) -> int:
        return sum(int(s.get("arrow_bytes", s.get("bytes", 0))) for s in manifest.get("shards", [])
                   if s.get("split") in names)

    small: tuple[str, ...] = ()
    if getattr(data_cfg, "materialize", False):
        store = ray.cluster_resources().get("object_store_memory", 0)
        budget = DRIVER_LOAD_FRACTION * store
        if store and 0 < size(splits) <= budget:
            small = tuple(splits)
        elif store and 0 < size([s for s in splits if s != "train"]) <= budget:
            small = tuple(s for s in splits if s != "train")
    out: dict[str, Any] = {}
    rest = tuple(s for s in splits if s not in small)
    if rest:
        out.update(data.build_datasets(data_cfg, splits=rest, manifest=manifest))
    if small:
        from ray.data import RandomSeedConfig

        st = storage_target(data_cfg.uri, data_cfg.s3_endpoint)
        cols = data.train_columns(manifest, data_cfg)
        for split in small:
            tables = [pq.read_table(f"{st.root}/{s['path']}", columns=cols, filesystem=st.fs)
                      for s in manifest["shards"] if s["split"] == split]
            if not tables:
                raise ConfigError(f"split {split!r} not in {data_cfg.uri} (has {sorted(manifest.get('counts', {}))})")
            ds = ray.data.from_arrow(tables)
            if split == "train":
                ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=data_cfg.shuffle_seed,
                                                                    reseed_after_execution=True))
            else:
                ds.context.execution_options.preserve_order = True
            out[split] = ds
        log.info("read %s in the driver into the object store (%.1f MiB)", ", ".join(small), size(small) / 2**20)
    return {s: out[s] for s in splits}


def _git_sha() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_outputs(pf: Preflight, ret: Mapping[str, Any]) -> TrainResult:
    """metrics.json, predictions.parquet, curves.png, tensorboard/, history.json, config.yaml (driver)."""
    from psamf import __version__
    from psamf.metrics import trivial_baselines
    from psamf.outputs import plot_curves, write_bytes, write_history, write_json, write_predictions, \
        write_tensorboard

    cfg, st = pf.cfg, pf.storage
    fs, run_dir = st.fs, st.run_dir(cfg.run.name)
    o = cfg.optim
    sel = ret["selected_epoch"]
    history = list(ret["history"])
    metrics = {
        "run_name": cfg.run.name,
        "seed": o.seed,
        "dataset": cfg.data.dataset,
        "selection": {
            "rule": "one checkpoint selected on the validation split only (best optim.select_metric, later epoch "
                    "on ties); the test split evaluated once, on that checkpoint, after training",
            "metric": o.select_metric, "mode": o.select_mode, "selected_epoch": sel,
            "early_stopped": bool(ret.get("early_stopped")), "early_stop_patience": o.early_stop_patience,
            "epochs_trained": len(history), "epochs_max": o.epochs,
        },
        "valid": ret["valid"]["metrics"],
        "test": ret["test"]["metrics"],
        "baselines": {s: trivial_baselines(np.asarray(ret[s]["label"]), cfg.data.dataset) for s in ("valid", "test")},
        "selected_epoch_record": next((r for r in history if r["epoch"] == sel), None),
        "checkpoint": _uri(st, ret.get("checkpoint_path")),
        "world_size": ret.get("world_size"), "amp": ret.get("amp"), "device": ret.get("device"),
        "sessions": 1 + max((int(r.get("session", 0)) for r in history), default=0),
        "psamf_version": __version__, "git_sha": _git_sha(), "preset": cfg.preset,
    }
    paths = {k: f"{st.run_uri(cfg.run.name)}/{v}" for k, v in {
        "metrics": "metrics.json", "predictions": "predictions.parquet", "curves": "curves.png",
        "tensorboard": "tensorboard", "history": "history.json", "config": "config.yaml"}.items()}
    write_predictions(fs, f"{run_dir}/predictions.parquet",
                      [(s, ret[s]["ids"], ret[s]["label"], ret[s]["pred"]) for s in ("valid", "test")])
    write_history(fs, run_dir, history)
    write_tensorboard(fs, run_dir, history, final={"selected_epoch": sel, "test": ret["test"]["metrics"]})
    write_bytes(fs, f"{run_dir}/curves.png", plot_curves(history, sel, title=f"{cfg.run.name} (seed {o.seed})"))
    write_bytes(fs, f"{run_dir}/config.yaml", cfg.to_yaml().encode())
    write_json(fs, f"{run_dir}/metrics.json", metrics)  # last: its presence means the run's outputs are complete
    if metrics["checkpoint"]:
        paths["checkpoint"] = metrics["checkpoint"]
    from psamf.outputs import json_safe

    safe = json_safe(metrics)
    return TrainResult(run_name=cfg.run.name, run_dir=st.run_uri(cfg.run.name), metrics=safe, paths=paths,
                       history=history, table=metrics_table(safe))


def _uri(st: Any, fs_path: str | None) -> str | None:
    """A checkpoint's filesystem path as a URI the user can paste (s3://... when the storage is S3)."""
    if not fs_path:
        return None
    if st.uri.startswith("s3://") and not fs_path.startswith("s3://"):
        return "s3://" + fs_path.lstrip("/")
    return fs_path


def fit_one(pf: Preflight, *, datasets: Mapping[str, Any] | None = None, max_steps: int | None = None,
            fault: Mapping[str, Any] | None = None, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fit one run (one seed) and write its outputs. `pf` comes from `preflight`."""
    from psamf.outputs import write_bytes

    cfg, st = pf.cfg, pf.storage
    # the resolved config goes into the run directory before any worker starts (it is also the resume guard)
    write_bytes(st.fs, f"{st.run_dir(cfg.run.name)}/config.yaml", cfg.to_yaml().encode())
    t0 = time.perf_counter()
    trainer = build_trainer(pf, datasets=datasets, max_steps=max_steps, fault=fault, callbacks=callbacks)
    t1 = time.perf_counter()
    # local mode runs the loop in this process, so its log lines already reach the console
    printer = (_HistoryPrinter(st.fs, st.run_dir(cfg.run.name), cfg.optim.select_metric)
               if runtime.quiet() and cfg.run.num_workers > 0 else contextlib.nullcontext())
    with printer:
        result = trainer.fit()
    t2 = time.perf_counter()
    ret = result.return_value
    if result.error is not None:
        raise result.error
    if not ret:
        raise RuntimeError(f"run {cfg.run.name}: rank 0 returned nothing (result: {result})")
    res = write_run_outputs(pf, ret)
    log.info("run %s: datasets %.1f s, fit %.1f s, outputs %.1f s", cfg.run.name, t1 - t0, t2 - t1,
             time.perf_counter() - t2)
    return res


def _seed_config(cfg: Config, seed: int) -> Config:
    return cfg.override([f"optim.seed={seed}", f"run.name={cfg.run.name}-seed{seed}"])


def _parallel_runs(cfg: Config, n: int) -> int:
    """How many seeds fit side by side: full worker groups with one CPU left for Ray Data."""
    import ray

    res = ray.cluster_resources()
    w = max(1, cfg.run.num_workers)
    cpu = int((res.get("CPU", 0) - 1) // (w * cfg.run.cpus_per_worker + 1))  # + 1: the Train controller
    k = max(1, cpu)
    if cfg.run.use_gpu:
        k = min(k, max(1, int(res.get("GPU", 0) // (w * cfg.run.gpus_per_worker))))
    return max(1, min(n, k))


def train(cfg: Config, *, seeds: Sequence[int] | None = None, max_steps: int | None = None) -> TrainResult:
    """Train (one run, or one run per seed) and write every output. Starts/joins Ray if needed (`init_ray`).

    Seeds: run names `<run.name>-seed<k>`, `optim.seed=k`, run in parallel threads where the cluster has room for
    several worker groups; the summary (mean ± population std of the test metrics) is printed with
    `psamf.metrics.format_table` and written to `<storage_path>/<run.name>-seeds.json`.
    All configs are checked (`preflight`) before any worker starts.
    """
    init_ray(cfg.run.num_workers)
    if not seeds:
        pf = preflight(cfg)
        return fit_one(pf, max_steps=max_steps)

    from concurrent.futures import ThreadPoolExecutor

    from psamf.metrics import format_table, summarize_seeds
    from psamf.outputs import write_json

    seeds = list(dict.fromkeys(int(s) for s in seeds))
    first = preflight(_seed_config(cfg, seeds[0]))
    pfs = [first] + [preflight(_seed_config(cfg, s), manifest=first.manifest) for s in seeds[1:]]
    k = _parallel_runs(cfg, len(seeds))
    log.info("training %d seed(s) %s, %d at a time", len(seeds), seeds, k)
    if k == 1:
        results = [fit_one(pf, max_steps=max_steps) for pf in pfs]
    else:
        with ThreadPoolExecutor(max_workers=k, thread_name_prefix="psamf-seed") as ex:
            results = list(ex.map(lambda pf: fit_one(pf, max_steps=max_steps), pfs))
    keys = [k for k in results[0].metrics["test"] if k not in ("n", "n_non0")]
    test = [{k: (r.metrics["test"][k] if r.metrics["test"][k] is not None else math.nan) for k in keys}
            for r in results]
    summary = summarize_seeds(test)
    table = format_table(test, title=f"{cfg.run.name}: test metrics of the validation-selected checkpoint, "
                                     f"seeds {seeds}")
    st = first.storage
    summary_path = f"{st.root.rstrip('/')}/{cfg.run.name}-seeds.json"
    write_json(st.fs, summary_path, {
        "run_name": cfg.run.name, "seeds": seeds, "runs": [r.run_dir for r in results],
        "std": "population (ddof=0)", "test": {k: {"mean": m, "std": s} for k, (m, s) in summary.items()},
        "valid": {k: {"mean": m, "std": s} for k, (m, s) in summarize_seeds(
            [{k: (r.metrics["valid"][k] if r.metrics["valid"][k] is not None else math.nan) for k in keys}
             for r in results]).items()},
    })
    return TrainResult(run_name=cfg.run.name, run_dir=st.uri, metrics={"test": summary},
                       paths={"summary": f"{st.uri.rstrip('/')}/{cfg.run.name}-seeds.json"},
                       seeds=results, summary=summary, table=table)


# =============================================================================================
# CLI: psamf train
# =============================================================================================


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="start from a preset (default: tiny unless --config)")
    src.add_argument("--config", help="YAML config file")
    p.add_argument("--ablation", help="apply one ablation of the paper's table (no_personality, ...)")
    p.add_argument("--run-name", help="run.name (the resume key: re-using a name resumes that run)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 1111,1112,1113: one run per seed "
                                   "(<run-name>-seed<k>), then mean ± std")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny preset for 2 epochs on freshly synthesised MOSI-shaped data (keeps only the run "
                        "section of the config); data and run in a temporary directory, or next to the runs when "
                        "run.storage_path is remote; joins RAY_ADDRESS when set, else an embedded local Ray")
    p.add_argument("overrides", nargs="*", help="section.key=value (e.g. optim.epochs=3 run.num_workers=1)")


def load_config(args: argparse.Namespace) -> Config:
    from psamf.config import ablate

    if getattr(args, "config", None):
        cfg = Config.from_yaml(args.config)
    else:
        cfg = Config.from_preset(args.preset or "tiny")
    if getattr(args, "ablation", None):
        cfg = ablate(cfg, args.ablation)
    items = list(args.overrides or [])
    if getattr(args, "run_name", None):
        items.append(f"run.name={args.run_name}")
    return cfg.override(items)


def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    return seeds


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


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """Valid and test metrics of one run side by side (accuracies/F1 in %, MAE/Corr/losses raw)."""
    keys = [k for k in metrics["test"] if k not in ("n", "n_non0")]
    lines = [f"{'metric':<10} {'valid':>9} {'test':>9}"]
    for k in keys:
        row = []
        for split in ("valid", "test"):
            v = metrics[split].get(k)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                row.append(f"{'nan':>9}")
            elif k.startswith(("acc", "f1")):
                row.append(f"{100 * v:>8.2f}%")
            else:
                row.append(f"{v:>9.4f}")
        lines.append(f"{k:<10} " + " ".join(row))
    lines.append(f"{'n':<10} {metrics['valid'].get('n', 0):>9} {metrics['test'].get('n', 0):>9}")
    return "\n".join(lines)


def print_result(res: TrainResult, out=sys.stdout) -> None:
    if res.seeds:
        for r in res.seeds:
            print(f"  {r.run_name}: {r.run_dir}", file=out)
        print(res.table, file=out)
        print(f"summary: {res.paths.get('summary')}", file=out)
        return
    m = res.metrics
    sel = m["selection"]
    print(f"run {res.run_name}: selected epoch {sel['selected_epoch']} of {sel['epochs_trained']} trained, by "
          f"{sel['metric']} ({sel['mode']}, validation only); test evaluated once on it", file=out)
    print(res.table or metrics_table(m), file=out)
    b = m["baselines"]["test"]
    floors = {k: b[k] for k in ("mae_mean", "mae_zero", "acc2_has0", "acc2_non0", "acc7") if b.get(k) is not None}
    print("test floors (input-free predictors): " + ", ".join(
        f"{k}={100 * v:.2f}%" if k.startswith("acc") else f"{k}={v:.4f}" for k, v in floors.items()), file=out)
    print(f"outputs: {res.run_dir}  (metrics.json, predictions.parquet, curves.png, tensorboard/, "
          f"checkpoint_epoch=NNN/)", file=out)


def run(args: argparse.Namespace) -> int:
    """`psamf train` / jobs/train.py. Exit status 0 done, 2 bad configuration (no worker started), 1 failed."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args)
        seeds = parse_seeds(getattr(args, "seeds", None))
    except ConfigError as e:
        print(f"psamf train: {e}", file=sys.stderr)
        return 2
    workdir = None
    try:
        if getattr(args, "smoke_test", False):
            workdir = tempfile.mkdtemp(prefix="psamf-smoke-")
            cfg = smoke_config(cfg, workdir)
        log.info("psamf train: git %s, run %s, resolved config:\n%s", _git_sha() or "unknown", cfg.run.name,
                 cfg.to_yaml())
        res = train(cfg, seeds=seeds)
        print_result(res)
        if workdir and res.run_dir.startswith(workdir):
            print("(smoke test: the run directory is temporary and is deleted now)")
    except ConfigError as e:
        print(f"psamf train: {e}", file=sys.stderr)
        return 2
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
