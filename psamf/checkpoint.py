"""The checkpoint directory format, and opening checkpoints for resuming or inference.

A checkpoint is a directory `checkpoint_epoch=NNN/` (Ray Train's `checkpoint_dir_name`) holding:

    model.pt         the unwrapped model's state dict (`torch.load(weights_only=True)`-safe)
    train_state.pt   optimizer, scheduler, selector, epoch, history (a JSON string: NaN kept), every rank's RNG
                     states, the session counter (how many times the run was started)
    config.yaml      the resolved config of the run (the checkpoint carries its config)
    meta.json        epoch, version, selection state, the epoch's metrics and the sha256 and size of every other
                     file (written last: a checkpoint whose files disagree with it is damaged)

Integrity: `verify_checkpoint` re-hashes the files against meta.json. Before a run starts, the driver calls
`repair_run`: damaged checkpoints, newest first, are set aside (`checkpoint_epoch=NNN.corrupt-<k>`, kept for a
post-mortem, never deleted) with a warning until an intact one is found, and Ray's run snapshot
(`checkpoint_manager_snapshot.json`, Ray 2.60) is rewritten to name only checkpoint directories that exist, so
that the run resumes from the newest intact checkpoint instead of failing on restore, and a checkpoint directory
that disappeared does not make Ray refuse the run (`CheckpointManagerInitializationError`). The snapshot is also
made to name that newest intact checkpoint: a run stopped (Ctrl+C, a killed driver) after a worker uploaded an
epoch's checkpoint but before Ray's controller registered it leaves the directory whole and the snapshot without
it (no snapshot at all after the first epoch), and Ray would restart from the snapshot's older checkpoint, or from
scratch, while psamf reported resuming from the newer one.

Ray keeps the best `run.keep_checkpoints` by the selection metric **and always the latest one** (Ray 2.60's
`CheckpointManager` never deletes the latest registered checkpoint), so a restart or a re-run of the same
`run.name` continues from the latest epoch; the history travels inside the checkpoint, so no epoch is recorded
twice. Ray Train local mode (`run.num_workers=0`) neither persists nor restores checkpoints: `LocalCheckpoints`
writes the same directories with the same retention under the run directory, so such a run resumes too.

Reading: `open_checkpoint` gives a private local directory for a local or remote checkpoint (see its docstring
for the race it avoids); `resolve_checkpoint` turns a run directory into its validation-selected checkpoint;
`load_model` builds the model of a checkpoint's config and loads its weights for inference.

Writing for inference only: `write_inference_checkpoint` writes model.pt, config.yaml and meta.json (no
train_state.pt: nothing to resume) to a local or remote directory, for example a converted reference checkpoint
(`psamf convert`); `evaluate`, `load_model` and `verify_checkpoint` take it like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from psamf.config import Config, ConfigError
from psamf.engine import Selector, unwrap

__all__ = [
    "CHECKPOINT_DIR",
    "save_checkpoint",
    "write_inference_checkpoint",
    "check_new_checkpoint_dir",
    "is_converted",
    "load_checkpoint",
    "load_model_weights",
    "checkpoint_config",
    "open_checkpoint",
    "local_checkpoint",
    "LocalCheckpoints",
    "resolve_checkpoint",
    "load_model",
    "CheckpointError",
    "verify_checkpoint",
    "repair_run",
    "RAY_SNAPSHOT",
]

log = logging.getLogger("psamf.checkpoint")

CHECKPOINT_DIR = "checkpoint_epoch={epoch:03d}"
CHECKPOINT_RE = re.compile(r"checkpoint_epoch=(\d+)")
# Ray 2.60 Train V2 keeps the list of registered checkpoints of a run in this file of the run directory
# (ray.train.v2 CheckpointManager; restored on every start of the same RunConfig(name)).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
_CHUNK = 8 * 1024 * 1024


class CheckpointError(ConfigError):
    """A checkpoint file is missing, truncated or does not match its recorded checksum (exit status 2)."""


def _sha256_stream(stream: Any) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            return h.hexdigest(), n
        h.update(chunk)
        n += len(chunk)


def _file_digests(path: str) -> dict[str, dict[str, Any]]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name != "meta.json" and os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), "rb") as f:
                digest, size = _sha256_stream(f)
            out[name] = {"sha256": digest, "bytes": size}
    return out


def save_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    selector: Selector, epoch: int, history: Sequence[Mapping[str, Any]], cfg: Config,
                    rng_states: Sequence[Mapping[str, Any]] | None = None, session: int = 0,
                    metrics: Mapping[str, Any] | None = None, scaler: Any = None) -> None:
    """Write a checkpoint directory: model.pt (unwrapped state dict), train_state.pt, config.yaml, meta.json.
    `scaler`: the float16 loss scaler, whose scale a resumed run continues from."""
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
        "scaler": scaler.state_dict() if scaler is not None else None,
    }, os.path.join(path, "train_state.pt"))
    cfg.to_yaml(os.path.join(path, "config.yaml"))
    meta = {"epoch": int(epoch), "psamf_version": __version__, "select_metric": selector.metric,
            "select_mode": selector.mode, "best_epoch": selector.best_epoch, "session": int(session),
            "metrics": dict(metrics or {}), "files": _file_digests(path)}
    tmp = os.path.join(path, ".meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, default=str)
    os.replace(tmp, os.path.join(path, "meta.json"))  # last: the files it lists are complete


def check_new_checkpoint_dir(uri: str, *, s3_endpoint: str | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of a checkpoint directory about to be written; a `CheckpointError` if `uri`
    already holds anything (checkpoints are never overwritten). Callers check before expensive work."""
    import pyarrow.fs as pafs

    from psamf.storage import resolve

    st = resolve(uri, s3_endpoint)
    fs, dest = st.fs, st.root
    if fs is None:
        raise ConfigError(f"{uri}: checkpoints can be written to local paths and s3:// (or other pyarrow) URIs only")
    if fs.get_file_info(dest).type == pafs.FileType.File:
        raise CheckpointError(f"{uri} is a file; a checkpoint is a directory: choose another path")
    if isinstance(fs, pafs.LocalFileSystem):  # the nearest existing directory above it must be one
        above = os.path.dirname(dest.rstrip("/"))
        while above and not os.path.exists(above) and above != os.path.dirname(above):
            above = os.path.dirname(above)
        if above and os.path.exists(above) and not os.path.isdir(above):
            raise CheckpointError(f"{uri}: {above} on its path is a file, not a directory")
    if any(True for _ in fs.get_file_info(pafs.FileSelector(dest, allow_not_found=True))):
        raise CheckpointError(f"{uri} already exists and is not empty; a checkpoint is never overwritten: choose "
                              "another directory or remove it")
    return fs, dest


def write_inference_checkpoint(uri: str, model: nn.Module, cfg: Config, *, s3_endpoint: str | None = None,
                               meta: Mapping[str, Any] | None = None) -> str:
    """Write a checkpoint directory holding only what inference needs: model.pt, config.yaml, meta.json.

    `uri` is a local path or a URI (`s3://...`) of a directory that must not exist yet (or be empty): a
    checkpoint is never overwritten. Atomic: on a local disk the files are written into a temporary sibling
    directory that is renamed to `uri` once complete; on an object store every file is one PUT and meta.json,
    which lists the size and sha256 of the others, comes last (a directory without it reads as an interrupted
    write). `meta`: extra fields for meta.json (where the weights came from). Returns the path written."""
    import pyarrow.fs as pafs

    from psamf import __version__
    from psamf.storage import json_safe, write_bytes

    fs, dest = check_new_checkpoint_dir(uri, s3_endpoint=s3_endpoint)
    buf = io.BytesIO()
    torch.save(unwrap(model).state_dict(), buf)
    files = {"model.pt": buf.getvalue(), "config.yaml": cfg.to_yaml().encode()}
    record = {"epoch": None, "psamf_version": __version__, **dict(meta or {}),
              "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in files.items()}}
    files["meta.json"] = json.dumps(json_safe(record), indent=2).encode()  # last: the files it lists are complete
    local = isinstance(fs, pafs.LocalFileSystem)
    stage = f"{os.path.dirname(dest)}/.{os.path.basename(dest)}.tmp-{uuid.uuid4().hex[:8]}" if local else dest
    try:
        for name, data in files.items():
            write_bytes(fs, f"{stage}/{name}", data)
        if local:
            os.replace(stage, dest)  # POSIX rename: onto a missing or empty directory, atomically
    finally:
        if local and os.path.isdir(stage):
            shutil.rmtree(stage, ignore_errors=True)
    return dest


def verify_checkpoint(fs: Any, path: str) -> list[str]:
    """What is wrong with the checkpoint directory `path` on the pyarrow filesystem `fs` (empty: intact).

    Every file listed in meta.json must exist with its recorded size and sha256. A checkpoint written before
    checksums were recorded (no "files" in meta.json) is checked for its files' presence only."""
    import pyarrow.fs as pafs

    try:
        with fs.open_input_stream(f"{path}/meta.json") as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        return [f"{path}/meta.json is missing (an interrupted write)"]
    except (OSError, ValueError) as e:
        return [f"{path}/meta.json is unreadable: {e}"]
    files = meta.get("files") or {n: None for n in ("model.pt", "train_state.pt", "config.yaml")}
    problems = []
    for name, want in files.items():
        fp = f"{path}/{name}"
        if fs.get_file_info(fp).type != pafs.FileType.File:
            problems.append(f"{fp} is missing")
            continue
        if want is None:
            continue
        try:
            with fs.open_input_stream(fp) as f:
                digest, size = _sha256_stream(f)
        except OSError as e:
            problems.append(f"{fp} is unreadable: {e}")
            continue
        if size != want["bytes"] or digest != want["sha256"]:
            problems.append(f"{fp} is damaged: {size} bytes, sha256 {digest[:12]}..., but {want['bytes']} bytes, "
                            f"sha256 {want['sha256'][:12]}... were written")
    return problems


def _checkpoint_dirs(fs: Any, run_dir: str) -> dict[int, str]:
    import pyarrow.fs as pafs

    out = {}
    for info in fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True)):
        m = CHECKPOINT_RE.fullmatch(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            out[int(m.group(1))] = info.path
    return out


def _set_aside(fs: Any, path: str) -> str:
    """Rename a damaged checkpoint out of the names Ray and psamf look at (kept for a post-mortem)."""
    from psamf.storage import move_dir

    k = 0
    while fs.get_file_info(f"{path}.corrupt-{k}").type.name != "NotFound":
        k += 1
    move_dir(fs, path, f"{path}.corrupt-{k}")
    return f"{path}.corrupt-{k}"


def repair_run(fs: Any, run_dir: str, *, ray_train: bool = True) -> int | None:
    """Make a run directory resumable; returns the epoch of its newest intact checkpoint (None: none).

    Damaged checkpoints, newest first, are set aside with a warning until an intact one is found (older ones are
    not read: a resume only needs the newest intact one). Then Ray's run snapshot is rewritten to name only the
    checkpoint directories that exist and, when Ray Train restores the run (`ray_train`; not in local mode, where
    `LocalCheckpoints` reads the directories themselves), to name the newest intact one as the latest (see the
    module docstring), so that Ray's `get_checkpoint()` in the workers is the checkpoint this returns."""
    dirs = _checkpoint_dirs(fs, run_dir)
    latest = None
    for epoch in sorted(dirs, reverse=True):
        problems = verify_checkpoint(fs, dirs[epoch])
        if not problems:
            latest = epoch
            break
        moved = _set_aside(fs, dirs[epoch])
        older = [e for e in dirs if e < epoch]
        log.warning("checkpoint epoch %d is damaged (%s); set aside as %s; %s", epoch, "; ".join(problems), moved,
                    f"falling back to the checkpoint of epoch {max(older)}" if older else "no older checkpoint")
        del dirs[epoch]
    _repair_ray_snapshot(fs, run_dir, set(CHECKPOINT_DIR.format(epoch=e) for e in dirs),
                         newest=None if latest is None or not ray_train else dirs[latest])
    return latest


def _empty_ray_snapshot() -> dict[str, Any]:
    """Ray 2.60's run snapshot of a run that has registered no checkpoint (`_CheckpointManagerState`)."""
    from importlib.metadata import version

    return {"ray_version": version("ray"), "checkpoint_results": [], "checkpoint_report_indices": [],
            "latest_checkpoint_result": None, "pending_training_results": [], "pending_validation_specs": [],
            "current_report_index": 0, "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}


def _ray_score(metrics: Mapping[str, Any], metric: str, mode: str) -> tuple[bool, float]:
    """The order Ray 2.60's checkpoint manager keeps its checkpoints in (worst first; `_get_checkpoint_score`):
    NaN or a missing metric below every number, `mode="min"` negated."""
    value = metrics.get(metric)
    score = (1.0 if mode == "max" else -1.0) * float("-inf" if value is None else value)
    return (False, float("-inf")) if math.isnan(score) else (True, score)


def _adopt(fs: Any, snap: dict[str, Any], path: str, name: str) -> None:
    """Register the intact checkpoint directory `path` (named `name`) in Ray's run snapshot `snap` as its latest
    checkpoint, where Ray's controller would have put it: the metrics its worker reported (meta.json's, without the
    None values the report leaves out), the next report index, the place its score gives it among the others."""
    from psamf.storage import read_bytes

    meta = json.loads(read_bytes(fs, f"{path}/meta.json"))
    result = {"version": 0, "checkpoint_dir_name": name,
              "metrics": {k: v for k, v in (meta.get("metrics") or {}).items() if v is not None}}
    index = int(snap["current_report_index"])
    pairs = [*zip(snap["checkpoint_results"], snap["checkpoint_report_indices"]), (result, index)]
    metric, mode = meta.get("select_metric", ""), meta.get("select_mode", "min")
    pairs.sort(key=lambda ri: (*_ray_score(ri[0]["metrics"], metric, mode), ri[1]))  # ties: the later one last
    snap["checkpoint_results"] = [r for r, _ in pairs]
    snap["checkpoint_report_indices"] = [i for _, i in pairs]
    snap["latest_checkpoint_result"] = result
    snap["current_report_index"] = index + 1


def _drop_missing(snap: dict[str, Any], present: set[str]) -> list[str]:
    """Drop the references of Ray's run snapshot `snap` to checkpoint directories that are not `present`; the
    latest becomes the remaining one reported last. Returns the names dropped."""
    results, indices = snap["checkpoint_results"], snap["checkpoint_report_indices"]
    keep = [(r, i) for r, i in zip(results, indices) if r.get("checkpoint_dir_name") in present]
    if len(keep) == len(results):
        return []
    snap["checkpoint_results"] = [r for r, _ in keep]
    snap["checkpoint_report_indices"] = [i for _, i in keep]
    snap["latest_checkpoint_result"] = max(keep, key=lambda ri: ri[1])[0] if keep else None
    pending = [(r, v) for r, v in zip(snap.get("pending_training_results") or [],
                                      snap.get("pending_validation_specs") or [])
               if r.get("checkpoint_dir_name") in present]
    snap["pending_training_results"] = [r for r, _ in pending]
    snap["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        snap[key] = [n for n in snap.get(key) or [] if n in present]
    return sorted({r.get("checkpoint_dir_name") for r in results} - {r["checkpoint_dir_name"] for r, _ in keep})


def _repair_ray_snapshot(fs: Any, run_dir: str, present: set[str], newest: str | None = None) -> None:
    """Make Ray's run snapshot name only checkpoint directories that are `present` (`_drop_missing`), and name the
    directory `newest` (the newest intact checkpoint) as the latest, registering it when it is not there
    (`_adopt`; a snapshot is created when there is none). Written only when something changed (atomically where
    the filesystem can)."""
    from psamf.storage import exists, read_bytes, write_bytes

    path = f"{run_dir}/{RAY_SNAPSHOT}"
    if exists(fs, path):
        try:
            snap = json.loads(read_bytes(fs, path))
            dropped = _drop_missing(snap, present)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: Ray's run snapshot is unreadable ({e}); move the run directory aside or "
                                  "choose a new run.name") from None
    elif newest is None:
        return
    else:
        snap, dropped = _empty_ray_snapshot(), []
    name = None if newest is None else newest.rstrip("/").rsplit("/", 1)[-1]
    adopt = name is not None and name not in {r.get("checkpoint_dir_name") for r in snap["checkpoint_results"]}
    if adopt:
        _adopt(fs, snap, newest, name)
    if dropped or adopt:
        write_bytes(fs, path, json.dumps(snap).encode())
    if dropped:
        log.warning("%s: removed the references to %s (not in the run directory)", path, ", ".join(dropped))
    if adopt:
        log.info("%s was written but not registered in Ray's run snapshot (the run was stopped in between): "
                 "registered it as the latest checkpoint, which the run resumes from", newest)


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


def load_model_weights(path: str, model: nn.Module, *, name: str | None = None) -> None:
    """Load a checkpoint directory's model.pt into `model` (unwrapped or DDP), strictly. An unreadable file is a
    `CheckpointError` naming it (`name`: how to call the directory when `path` is a private local copy)."""
    try:
        state = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{name or path}/model.pt is unreadable (truncated or damaged?): "
                              f"{str(e).splitlines()[0]}") from None
    unwrap(model).load_state_dict(state)


def load_checkpoint(path: str, *, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, selector: Selector | None = None, scaler: Any = None) -> dict[str, Any]:
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
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    state["history"] = json.loads(state["history"])
    return state


def checkpoint_config(path: str) -> Config:
    """The resolved config a checkpoint directory carries."""
    return Config.from_yaml(os.path.join(path, "config.yaml"))


def is_converted(fs: Any, path: str) -> bool:
    """Whether the checkpoint directory `path` on `fs` was written by `write_inference_checkpoint` from weights
    trained elsewhere (`psamf convert`: meta.json records no epoch), not by a psamf run. False when unreadable."""
    try:
        with fs.open_input_stream(f"{path.rstrip('/')}/meta.json") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "epoch" in meta and meta["epoch"] is None


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
            m = CHECKPOINT_RE.fullmatch(info.base_name)
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
