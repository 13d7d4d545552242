"""The training engine: plain PyTorch, no Ray.

Everything a training or evaluation loop does on one process, whatever launches it (Ray Train workers in
`psamf.train`, Ray Train local mode, `psamf.evaluate`, the benchmarks, a notebook):

    train_step(model, batch, optimizer, cfg)     one optimiser step: autocast, named loss terms, clipping
    train_epoch(model, batches, optimizer, cfg)  the loop body of one epoch: steps, loss sums, data-wait timing
    epoch_record(epoch, parts, ...)              one history record from every rank's epoch statistics
    evaluate(model, batches, cfg, keep=...)      predictions, labels, ids and loss sums (a rank's part of a split)
    gather_eval / EvalOutput.merge               every rank's part, merged and checked for duplicates
    eval_metrics(out, dataset)                   the data set's metrics plus per-sample loss means
    build_optimizer / build_scheduler            Adam with two named parameter groups, plateau schedule
    Selector                                     validation-only model selection and early stopping
    seed_everything / rng_state / set_rng_state  reproducible streams that survive a resume
    all_gather / eval_partition                  torch.distributed helpers, inert in a single process

Selection rule. The selected checkpoint is the epoch with the best `optim.select_metric` (validation only) in
`optim.select_mode`; on equal scores the **later** epoch wins and NaN is worst, exactly the order Ray's
`CheckpointConfig(checkpoint_score_attribute=...)` keeps, so the selected checkpoint is always among the
`run.keep_checkpoints` Ray retains. Early stopping counts epochs since the last **strict** improvement.
`val_loss` is the validation L1 as a per-sample mean (the quantity the reference steps its plateau scheduler on);
`val_total`, `val_l1`, `val_ccl`, ... are the loss terms averaged over validation samples (the contrastive terms
depend on batch composition, so they are indicative only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from psamf.config import Config, ConfigError, OptimConfig
from psamf.losses import compute_losses
from psamf.metrics import compute_metrics
from psamf.model import HOST_INPUT_KEYS, model_inputs, param_groups

__all__ = [
    "LOSS_TERMS",
    "EvalOutput",
    "EpochStats",
    "Selector",
    "resolve_amp",
    "move_to_device",
    "batch_ids",
    "train_step",
    "forward_backward",
    "HostCopy",
    "optimizer_step",
    "make_scaler",
    "train_epoch",
    "epoch_record",
    "memory_stats",
    "reset_gpu_peak",
    "release_memory",
    "evaluate",
    "gather_eval",
    "eval_metrics",
    "selectable_metrics",
    "build_optimizer",
    "maybe_compile",
    "build_scheduler",
    "group_lrs",
    "seed_everything",
    "rng_state",
    "set_rng_state",
    "all_gather",
    "eval_partition",
    "timed_batches",
    "unwrap",
]

LOSS_TERMS = ("total", "l1", "ccl", "ps", "clm")

def resolve_amp(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for `optim.amp` on `device`: auto = bf16 on CUDA GPUs that support it, else off;
    fp16 = float16 (train with `make_scaler`'s loss scaling)."""
    device = torch.device(device)
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ConfigError(f"optim.amp must be auto, bf16, fp16 or off, got {amp!r}")


def make_scaler(amp_dtype: torch.dtype | None, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for float16 autocast (its gradients underflow without one); None otherwise (bf16
    has float32's range and needs none)."""
    if amp_dtype != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_to_device(batch: Mapping[str, Any], device: torch.device | None) -> dict[str, Any]:
    """The batch's tensors on `device`, except `HOST_INPUT_KEYS` (the frame lengths), which the model needs on the
    host: copying them over would make the model copy them back, a device->host sync every step."""
    if device is None:
        return dict(batch)
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) and k not in HOST_INPUT_KEYS else v)
            for k, v in batch.items()}


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


class HostCopy:
    """A tensor's values as of now, read on the host later. On CUDA: a non-blocking copy into page-locked memory
    and an event recorded after it, so that `tolist()` waits for the work queued before the copy, not for what
    was queued since. Elsewhere (the CPU, other devices) a copy on the tensor's device, read by `tolist()`."""

    def __init__(self, t: Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(t.device))
            self._t = host
        else:
            self._t = t.detach().clone()

    def tolist(self) -> Any:
        if self._event is not None:
            self._event.synchronize()
        return self._t.tolist()


def forward_backward(model: nn.Module, batch: Mapping[str, Any], cfg: Config, device: torch.device,
                     amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None,
                     loss_scale: float) -> dict[str, float]:
    """Forward, losses and backward of one (micro-)batch; gradients accumulate into `.grad`. The backward pass
    sees `total x loss_scale` (1 / grad_accum), scaled further by `scaler` under float16.

    The loss terms come back to the host in one copy (one read per term plus a `bool(isfinite)` would be six
    device-to-host syncs, each stalling the GPU queue). On a GPU that copy is queued before the backward pass,
    into pinned memory, and waited for after the backward pass has been queued: the host then waits for the
    forward pass only, and queues the optimiser step and the next batch while the device still runs the backward
    pass. A non-finite total still raises before the optimiser touches the weights."""
    with _autocast(device, amp_dtype):
        out = model(**model_inputs(batch))
    terms = compute_losses(_float32(out), batch["label"].float(), cfg.loss, cfg.model)
    total = terms["total"]
    values = HostCopy(torch.stack([v.detach().float() for v in terms.values()]))  # queued before the backward
    scaled = total * loss_scale if loss_scale != 1.0 else total
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    stats = dict(zip(terms, values.tolist()))  # the step's one wait on the device
    if not math.isfinite(stats["total"]):
        raise FloatingPointError(f"non-finite training loss: {stats}")
    stats["batch_size"] = int(batch["label"].shape[0])
    return stats


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config,
                   scaler: torch.amp.GradScaler | None, grad_factor: float = 1.0) -> Tensor | float:
    """Unscale (float16), rescale a short accumulation group (`grad_factor`), clip, step (the gradients stay
    for inspection until the next group's first backward zeroes them).
    Returns the gradient norm before clipping as a 0-d tensor on the device, left there so that the step does not
    wait for it (`float()` it when needed; `train_epoch` reads an epoch's norms in one copy), or NaN when
    clipping is off. Under float16 a step whose gradients overflowed is skipped by the scaler, which then lowers
    its scale."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_factor != 1.0:
        for p in _trainable(model):
            if p.grad is not None:
                p.grad.mul_(grad_factor)
    grad_norm: Tensor | float = math.nan
    if cfg.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(_trainable(model), cfg.optim.grad_clip).detach()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


def train_step(model: nn.Module, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer, cfg: Config, *,
               device: torch.device | None = None, amp_dtype: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One optimiser step on one batch. Returns every loss term (unweighted, plus `total`), `grad_norm`
    (before clipping; NaN when clipping is off) and `batch_size`, as floats.

    Forward under autocast when `amp_dtype` is set (bf16: no loss scaling needed; fp16: pass `make_scaler`'s
    scaler); losses in float32; `clip_grad_norm_(optim.grad_clip)` over all trainable parameters when
    grad_clip > 0. A non-finite total loss raises FloatingPointError before the optimiser touches the weights.
    Gradient accumulation (`optim.grad_accum`) is `train_epoch`'s business: this is always one whole step.
    """
    device = device or next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    stats = forward_backward(model, move_to_device(batch, device), cfg, device, amp_dtype, scaler, 1.0)
    stats["grad_norm"] = float(optimizer_step(model, optimizer, cfg, scaler))
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


def _label_array(x: Any) -> np.ndarray:
    """A 1-d float32 array of `x` (a tensor, on the host unless the caller moved it, or array-like)."""
    if isinstance(x, Tensor):
        return (x if x.device.type == "cpu" else x.cpu()).detach().float().numpy().reshape(-1)
    return np.asarray(x, dtype=np.float32).reshape(-1)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Any]], cfg: Config, *,
             device: torch.device | None = None, amp_dtype: torch.dtype | None = None,
             keep: Callable[[list[str]], np.ndarray] | None = None, losses: bool = True) -> EvalOutput:
    """Predict every sample of `batches` in eval mode.

    `keep(ids) -> bool mask` evaluates only the selected rows of each batch (used to partition an unsplit
    split across ranks). Pass the unwrapped model (not DDP): evaluation must not run DDP's collectives.
    Predictions and loss sums stay on the device until the pass ends and come back in one copy each (on a GPU
    a read per batch would stall the queue every batch); labels are taken from the batch before it moves.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids: list[str] = []
    preds: list[Tensor] = []  # on the device
    labels: list[np.ndarray] = []
    terms: list[str] = []
    sums: Tensor | None = None  # (terms,) loss term x batch size, summed in float64, on the device
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
            B = int(batch["label"].shape[0])
            labels.append(_label_array(batch["label"]))  # the collate's host copy: no device read
            batch = move_to_device(batch, device)
            with _autocast(device, amp_dtype):
                out = model(**model_inputs(batch))
            out = _float32(out)
            if losses:
                values = compute_losses(out, batch["label"].float(), cfg.loss, cfg.model)
                terms = list(values)
                batch_sums = torch.stack([v.detach().double() for v in values.values()]) * B
                sums = batch_sums if sums is None else sums + batch_sums
            ids += bid
            preds.append(out.prediction.detach().float().reshape(-1))
            n += B
    finally:
        model.train(was_training)
    loss_sums = dict(zip(terms, sums.cpu().tolist())) if sums is not None else {}
    return EvalOutput(ids=ids, pred=torch.cat(preds).cpu().numpy() if preds else np.zeros(0, np.float32),
                      label=np.concatenate(labels) if labels else np.zeros(0, np.float32), loss_sums=loss_sums, n=n)


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


def maybe_compile(model: nn.Module, optim: OptimConfig) -> nn.Module:
    """With `optim.compile`, `torch.compile` every BERT layer of the model in place (the sentiment BERT's text layers,
    the multimodal layers, the personality BERT's): `nn.Module.compile`, so modules, parameters and state_dict names
    stay the same, and checkpoints, DDP and `param_groups` are unaffected. Compilation happens lazily, at a layer's
    first forward; the second distinct sequence length compiles a dynamic-shape version that later lengths reuse.
    Returns the model.

    The BERT layers are where the matrix work is (99 % of a paper step's FLOPs). The whole model is not compiled: in
    torch 2.13, compiled with the varying frame counts of real batches, its backward fails a stride assertion in the
    cross-modal attention ("expected size 32==32, stride 7056==8000") after the switch to dynamic shapes, with or
    without `dynamic=True` and shape buckets (docs/benchmarks.md, "torch.compile")."""
    if optim.compile:
        from transformers.models.bert.modeling_bert import BertLayer

        for m in model.modules():
            if isinstance(m, BertLayer):
                m.compile()
    return model


FUSED_ADAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Adam:
    """Adam with two groups (psamf.model.param_groups): the sentiment BERT at lr_bert, the rest at lr_main.
    Coupled L2 weight decay, as the reference's Adam."""
    groups = [g for g in param_groups(model, optim) if g["params"]]
    # The fused kernel (CUDA, and CPU since torch 2.4): one launch for the whole update instead of a few per
    # parameter tensor, and no per-tensor step-counter reads. On a CPU it is 7x faster than the single-tensor
    # default for the paper model's 110 M parameters (0.05 against 0.39 s per step; docs/benchmarks.md).
    fused = all(p.device.type in ("cuda", "cpu") and p.dtype in FUSED_ADAM_DTYPES
                for g in groups for p in g["params"])
    return torch.optim.Adam(groups, fused=True) if fused else torch.optim.Adam(groups)


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



# ---- torch.distributed (inert in a single process) ------------------------------------------


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


def eval_partition(rank: int, world: int) -> Callable[[list[str]], np.ndarray]:
    """Rows this rank evaluates when every rank iterates the same, unsplit split: a stable hash of the id."""
    def keep(ids: list[str]) -> np.ndarray:
        return np.fromiter(((zlib.crc32(i.encode()) % world) == rank for i in ids), dtype=bool, count=len(ids))

    return keep



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



def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


# ---- one epoch ----------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """One rank's training statistics for one epoch (all_gather-able: plain Python values)."""

    sums: dict[str, float] = field(default_factory=dict)  # loss term x batch size, summed
    n: int = 0  # samples
    steps: int = 0  # batches
    optimizer_steps: int = 0  # = steps / optim.grad_accum, rounded up
    wait: float = 0.0  # seconds spent waiting for batches
    compute: float = 0.0  # seconds in train_step
    time: float = 0.0  # wall time of the epoch's training part
    tokens: int = 0  # real transcript tokens of the batches (the collate's host-side `text_tokens`)
    token_slots: int = 0  # token positions the sentiment BERT computed (batch x padded width)
    grad_norms: list[float] = field(default_factory=list)


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs, one item of lookahead."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def train_epoch(model: nn.Module, batches: Iterable[Mapping[str, Any]], optimizer: torch.optim.Optimizer,
                cfg: Config, *, device: torch.device | None = None, amp_dtype: torch.dtype | None = None,
                scaler: torch.amp.GradScaler | None = None,
                after_first_step: Callable[[], None] | None = None, where: str = "",
                on_step: Callable[[int, float], None] | None = None) -> EpochStats:
    """Train over `batches` and collect this rank's statistics. With `optim.grad_accum = k`, every k batches
    make one optimiser step (the loss of each scaled by 1/k; under DDP the gradients of the first k - 1 are kept
    local with `no_sync` and all-reduced once with the k-th); a shorter last group still steps, its gradients
    rescaled to a mean over the batches it had. `after_first_step` is a hook called once after the first
    optimiser step (the fault-injection test hook uses it); `on_step(steps, seconds)` after every batch
    (progress reporting); `where` prefixes a non-finite-loss error. `steps` counts batches, `optimizer_steps`
    optimiser steps."""
    device = device or next(model.parameters()).device
    accum = cfg.optim.grad_accum
    no_sync = getattr(model, "no_sync", None)  # DDP only
    model.train()
    st = EpochStats()
    t_epoch = time.perf_counter()
    in_group = 0
    norms: list[Tensor | float] = []  # read once at the end of the epoch: no host sync per step
    for (batch, waited), last in _with_last(timed_batches(batches)):
        t1 = time.perf_counter()
        step_now = last or in_group + 1 == accum
        sync = contextlib.nullcontext() if step_now or no_sync is None else no_sync()
        if in_group == 0:
            optimizer.zero_grad(set_to_none=True)
        try:
            with sync:
                stats = forward_backward(model, move_to_device(batch, device), cfg, device, amp_dtype, scaler,
                                          1.0 / accum)
        except FloatingPointError as e:
            raise FloatingPointError(f"{where}step {st.steps}: {e}") from None
        in_group += 1
        if step_now:
            norms.append(optimizer_step(model, optimizer, cfg, scaler, grad_factor=accum / in_group))
            st.optimizer_steps += 1
            in_group = 0
        st.compute += time.perf_counter() - t1
        st.wait += waited
        B = stats.pop("batch_size")
        if "text_tokens" in batch:
            st.tokens += batch["text_tokens"][0]
            st.token_slots += batch["text_tokens"][1]
        for k, v in stats.items():
            st.sums[k] = st.sums.get(k, 0.0) + v * B
        st.n += B
        st.steps += 1
        if st.optimizer_steps == 1 and step_now and after_first_step is not None:
            after_first_step()
        if on_step is not None:
            on_step(st.steps, time.perf_counter() - t_epoch)
    st.grad_norms = _host_floats(norms)
    st.time = time.perf_counter() - t_epoch
    return st


def _host_floats(values: Sequence[Tensor | float]) -> list[float]:
    """Floats from a mix of 0-d device tensors and floats, with one device-to-host copy for all the tensors."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    read = iter(torch.stack([t.float() for t in tensors]).cpu().tolist() if tensors else [])
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]


def memory_stats(device: torch.device) -> dict[str, float]:
    """This process's memory now, for an epoch's history record: `rss_gib`, its resident set (Linux; a reused
    Tune trial actor whose value climbs from trial to trial is leaking), and on CUDA `peak_gpu_mem_gib`, the most
    the caching allocator held for tensors since the last `reset_gpu_peak(device)` (the training loop resets it
    at the start of every epoch, so it is that epoch's peak, validation included)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as f:
            out["rss_gib"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        pass
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def release_memory() -> None:
    """Give back what a finished run left behind, for a process that goes on to the next (a reused Tune trial
    actor): collect reference cycles, empty PyTorch's CUDA cache, and return the C heap's free pages to the
    system (glibc's `malloc_trim`; elsewhere a no-op). docs/benchmarks.md, "Search throughput", has the figures."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def epoch_record(epoch: int, mine: EpochStats, parts: Sequence[EpochStats],
                 optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The history record of one epoch's training: per-sample loss means over every rank's samples, samples,
    steps, this rank's mean grad norm (before clipping), per-worker throughput, the data-wait fraction over
    all ranks, the slowest rank's time, and each parameter group's learning rate."""
    n_all = sum(p.n for p in parts)
    if n_all == 0:
        raise RuntimeError(f"epoch {epoch}: no training batch on any worker (train split too small for "
                           "optim.batch_size x run.num_workers?)")
    rec: dict[str, Any] = {"epoch": epoch}
    for k in mine.sums:
        rec[f"train_{k}"] = sum(p.sums.get(k, 0.0) for p in parts) / n_all
    rec["train_samples"] = n_all
    rec["train_steps"] = max(p.steps for p in parts)
    rec["optimizer_steps"] = max(p.optimizer_steps for p in parts)
    finite = [g for g in mine.grad_norms if math.isfinite(g)]
    rec["grad_norm"] = float(np.mean(finite)) if finite else math.nan
    rec["samples_per_s_per_worker"] = float(np.mean([p.n / p.time for p in parts if p.time > 0]))
    tot = sum(p.wait + p.compute for p in parts)
    rec["data_wait_frac"] = sum(p.wait for p in parts) / tot if tot > 0 else math.nan
    rec["time_train_s"] = max(p.time for p in parts)
    slots = sum(p.token_slots for p in parts)
    if slots:  # the share of the sentiment BERT's token positions that were padding (data.length_grouping cuts it)
        rec["train_padded_token_frac"] = 1.0 - sum(p.tokens for p in parts) / slots
    rec.update(group_lrs(optimizer))
    return rec
