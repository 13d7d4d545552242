"""The checkpoint directory format, and opening checkpoints for resuming or inference.

A checkpoint is a directory `checkpoint_epoch=NNN/` (Ray Train's `checkpoint_dir_name`) holding:

    model.pt         the unwrapped model's state dict (`torch.load(weights_only=True)`-safe)
    train_state.pt   optimizer, scheduler, selector, epoch, history (a JSON string: NaN kept), every rank's RNG
                     states, the session counter (how many times the run was started)
    config.yaml      the resolved config of the run (the checkpoint carries its config)
    meta.json        epoch, version, selection state and the epoch's metrics (human-readable)

Ray keeps the best `run.keep_checkpoints` by the selection metric **and always the latest one** (Ray 2.60's
`CheckpointManager` never deletes the latest registered checkpoint), so a restart or a re-run of the same
`run.name` continues from the latest epoch; the history travels inside the checkpoint, so no epoch is recorded
twice. Ray Train local mode (`run.num_workers=0`) neither persists nor restores checkpoints: `LocalCheckpoints`
writes the same directories with the same retention under the run directory, so such a run resumes too.

Reading: `open_checkpoint` gives a private local directory for a local or remote checkpoint (see its docstring
for the race it avoids); `resolve_checkpoint` turns a run directory into its validation-selected checkpoint;
`load_model` builds the model of a checkpoint's config and loads its weights for inference.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from psamf.config import Config, ConfigError
from psamf.engine import Selector, unwrap

__all__ = [
    "CHECKPOINT_DIR",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "checkpoint_config",
    "open_checkpoint",
    "local_checkpoint",
    "LocalCheckpoints",
    "resolve_checkpoint",
    "load_model",
]

CHECKPOINT_DIR = "checkpoint_epoch={epoch:03d}"


def save_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    selector: Selector, epoch: int, history: Sequence[Mapping[str, Any]], cfg: Config,
                    rng_states: Sequence[Mapping[str, Any]] | None = None, session: int = 0,
                    metrics: Mapping[str, Any] | None = None) -> None:
    """Write a checkpoint directory: model.pt (unwrapped state dict), train_state.pt, config.yaml, meta.json."""
    from psamf import __version__

    os.makedirs(path, exist_ok=True)
    torch.save(unwrap(model).state_dict(), os.path.join(path, "model.pt"))
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
def open_checkpoint(checkpoint: Any) -> Iterator[str]:
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
    unwrap(model).load_state_dict(state)


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
    """The resolved config a checkpoint directory carries."""
    return Config.from_yaml(os.path.join(path, "config.yaml"))


@contextlib.contextmanager
def local_checkpoint(uri: str, *, s3_endpoint: str | None = None) -> Iterator[str]:
    """A private local copy of a checkpoint (or of a run's selected checkpoint) named by a local path or a URI."""
    import ray.train

    fs, path = resolve_checkpoint(uri, s3_endpoint=s3_endpoint)
    with open_checkpoint(ray.train.Checkpoint(path, filesystem=fs)) as d:
        yield d


def resolve_checkpoint(uri: str, *, s3_endpoint: str | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, checkpoint path) for a checkpoint directory, or for a finished run directory (its
    validation-selected checkpoint, found by name **inside the directory the caller named**, so that a copied or
    moved run directory evaluates its own checkpoint, never the original's)."""
    from psamf.storage import exists, read_json, resolve

    st = resolve(uri, s3_endpoint)
    fs, path = st.fs, st.root
    if exists(fs, f"{path}/model.pt"):
        return fs, path
    if exists(fs, f"{path}/metrics.json"):
        recorded = read_json(fs, f"{path}/metrics.json").get("checkpoint")
        if not recorded:
            raise ConfigError(f"{uri}/metrics.json names no selected checkpoint")
        name = recorded.rstrip("/").rsplit("/", 1)[-1]
        if not exists(fs, f"{path}/{name}/model.pt"):
            raise ConfigError(f"{uri}: the selected checkpoint {name} (recorded as {recorded}) is not in this run "
                              "directory")
        return fs, f"{path}/{name}"
    raise ConfigError(f"{uri}: neither a checkpoint directory (model.pt) nor a finished run directory (metrics.json)")


def load_model(uri: str, *, s3_endpoint: str | None = None, overrides: Sequence[str] = (),
               device: torch.device | str = "cpu") -> tuple[nn.Module, Config]:
    """The model of a checkpoint (or a run's selected checkpoint) with its weights, in eval mode, and its config
    (with `overrides` applied: data and run keys only change where data is read, never the model's shape)."""
    from psamf.model import build_model

    with local_checkpoint(uri, s3_endpoint=s3_endpoint) as d:
        cfg = checkpoint_config(d).override(list(overrides))
        model = build_model(cfg.model)
        load_model_weights(d, model)
    return model.to(device).eval(), cfg


class LocalCheckpoints:
    """Checkpoints for Ray Train local mode (`run.num_workers=0`), which neither persists nor restores them.

    Same layout as Ray's: `<run dir>/checkpoint_epoch=NNN/` with the files of `save_checkpoint`, meta.json
    copied last (a directory without it is an interrupted copy and is ignored). Keeps the latest and the best
    `run.keep_checkpoints` by the selection metric, as Ray does, so re-running the run name resumes here too."""

    def __init__(self, storage: Sequence[Any], name: str, keep: int, selector: Selector):
        from psamf.storage import resolve

        st = resolve(storage[0], storage[1])
        self.fs, self.run_dir, self.keep, self.selector = st.fs, st.run_dir(name), keep, selector

    def complete(self) -> dict[int, str]:
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
