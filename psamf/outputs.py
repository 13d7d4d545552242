"""Run storage and run outputs: where a run lives, and the files written into its directory.

Storage. `run.storage_path` is a local directory (made absolute on the driver: Ray workers run in other working
directories), `s3://bucket/prefix`, or any URI pyarrow understands. For S3 with a custom endpoint (MinIO, moto),
`storage_target` builds a pyarrow `S3FileSystem(endpoint_override=...)` and drops the scheme, as Ray Train wants
for `RunConfig(storage_filesystem=...)` (shared/docs/ray-notes.md §3.1, §5.2). The endpoint is `run.s3_endpoint`,
else `data.s3_endpoint`, else `AWS_ENDPOINT_URL_S3`; credentials come from the usual AWS chain in every process.

Outputs (all under `<storage_path>/<run.name>/`, next to Ray's `checkpoint_epoch=NNN/` folders and snapshot):

    config.yaml          resolved config of the latest invocation (driver, before any worker starts)
    history.json         one record per finished epoch, rewritten by rank 0 after every epoch
    tensorboard/         one event file, rewritten from the history after every epoch (rank 0) and at the end
    metrics.json         selection, validation + test metrics of the selected checkpoint, baselines (driver, end)
    predictions.parquet  sample_id, split, label, prediction for valid and test (driver, end)
    curves.png           training curves (driver, end)

Writes are atomic per file: local files go through a temporary name and a rename; object stores publish an
object only when its upload completes. The TensorBoard file is replaced by writing the new file first, then
deleting the old one, so a reader never sees an empty directory (it may briefly see two files).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlparse

__all__ = [
    "RunStorage",
    "storage_target",
    "write_bytes",
    "read_bytes",
    "exists",
    "write_json",
    "read_json",
    "json_safe",
    "write_history",
    "write_tensorboard",
    "plot_curves",
    "write_predictions",
]


_PLOT_LOCK = threading.Lock()

# --------------------------------------------------------------------------------------------
# Where a run lives
# --------------------------------------------------------------------------------------------


@dataclass
class RunStorage:
    """How Ray Train and psamf reach a run's storage.

    storage_path:        what to pass as `RunConfig(storage_path=...)` (scheme dropped when `filesystem` is set)
    storage_filesystem:  a pyarrow filesystem for `RunConfig(storage_filesystem=...)`, or None (Ray infers it)
    fs, root:            the filesystem and scheme-less path that psamf itself uses to read/write
    uri:                 the storage path as the user wrote it (for messages), absolute when local
    """

    storage_path: str
    storage_filesystem: Any
    fs: Any
    root: str
    uri: str

    def run_dir(self, name: str) -> str:
        """The scheme-less path of a run's directory on `self.fs`."""
        return f"{self.root.rstrip('/')}/{name}"

    def run_uri(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"


def _endpoint(endpoint: str) -> tuple[str, str]:
    """'http://127.0.0.1:9000' -> ('127.0.0.1:9000', 'http'); a bare host:port means https."""
    if "://" in endpoint:
        u = urlparse(endpoint)
        return u.netloc, u.scheme
    return endpoint, "https"


def s3_filesystem(endpoint: str | None):
    """A pyarrow S3FileSystem; with `endpoint`, pointed at it (path-style, explicit region: no lookups)."""
    import pyarrow.fs as pafs

    if not endpoint:
        return pafs.S3FileSystem()
    host, scheme = _endpoint(endpoint)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return pafs.S3FileSystem(endpoint_override=host, scheme=scheme, region=region, force_virtual_addressing=False)


def storage_target(storage_path: str, s3_endpoint: str | None = None) -> RunStorage:
    """Resolve `run.storage_path` (+ an optional custom S3 endpoint) for Ray Train and for our own writes."""
    import pyarrow.fs as pafs

    if "://" not in storage_path:
        root = os.path.abspath(os.path.expanduser(storage_path))
        return RunStorage(storage_path=root, storage_filesystem=None, fs=pafs.LocalFileSystem(), root=root, uri=root)
    if storage_path.startswith("s3://") and "?" not in storage_path:
        endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        root = storage_path[len("s3://"):].rstrip("/")
        if endpoint:
            fs = s3_filesystem(endpoint)
            return RunStorage(storage_path=root, storage_filesystem=fs, fs=fs, root=root, uri=storage_path)
        fs = pafs.S3FileSystem()
        return RunStorage(storage_path=storage_path, storage_filesystem=None, fs=fs, root=root, uri=storage_path)
    fs, root = pafs.FileSystem.from_uri(storage_path)
    return RunStorage(storage_path=storage_path, storage_filesystem=None, fs=fs, root=root.rstrip("/"),
                      uri=storage_path)


# --------------------------------------------------------------------------------------------
# Atomic file primitives on a pyarrow filesystem
# --------------------------------------------------------------------------------------------


def _is_local(fs) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def write_bytes(fs, path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (rename on local disks; one PUT on object stores)."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if _is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_bytes(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, tuples -> lists: standard JSON."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (TypeError, ValueError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(fs, path: str, obj: Any) -> None:
    write_bytes(fs, path, (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode())


def read_json(fs, path: str) -> Any:
    return json.loads(read_bytes(fs, path))


# --------------------------------------------------------------------------------------------
# Run outputs
# --------------------------------------------------------------------------------------------


def write_history(fs, run_dir: str, history: Sequence[Mapping[str, Any]]) -> str:
    path = f"{run_dir}/history.json"
    write_json(fs, path, list(history))
    return path


# history key -> TensorBoard tag
def _tb_tag(key: str) -> str | None:
    if key.startswith("train_"):
        return f"loss/train/{key[len('train_'):]}"
    if key.startswith("val_"):
        name = key[len("val_"):]
        if name in ("loss", "total", "l1", "ccl", "ps", "clm"):
            return f"loss/val/{name}"
        if name in ("n", "n_non0"):
            return None
        return f"val/{name}"
    if key.startswith("lr_"):
        return f"lr/{key[len('lr_'):]}"
    if key in ("samples_per_s_per_worker", "data_wait_frac", "time_train_s", "time_eval_s", "grad_norm"):
        return f"perf/{key}"
    return None


def write_tensorboard(fs, run_dir: str, history: Sequence[Mapping[str, Any]],
                      final: Mapping[str, Any] | None = None) -> str:
    """(Re)write the run's TensorBoard events from the per-epoch history (step = epoch).

    Rewriting from the history (instead of appending live) keeps one scalar per epoch after worker restarts
    and resumes. `final` adds the selected checkpoint's test metrics at its epoch (`test/<metric>`).
    """
    from torch.utils.tensorboard import SummaryWriter

    tb_dir = f"{run_dir}/tensorboard"
    with tempfile.TemporaryDirectory(prefix="psamf-tb-") as tmp:
        w = SummaryWriter(log_dir=tmp)
        for rec in history:
            step = int(rec["epoch"])
            for k, v in rec.items():
                tag = _tb_tag(k)
                if tag is None or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if isinstance(v, float) and not math.isfinite(v):
                    continue
                w.add_scalar(tag, v, step)
        if final:
            step = int(final.get("selected_epoch", 0))
            for k, v in (final.get("test") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                        and k not in ("n", "n_non0"):
                    w.add_scalar(f"test/{k}", v, step)
        w.flush()
        w.close()
        new_files = sorted(os.listdir(tmp))
        old = []
        try:
            import pyarrow.fs as pafs

            old = [i.path for i in fs.get_file_info(pafs.FileSelector(tb_dir, allow_not_found=True))
                   if i.type == pafs.FileType.File]
        except OSError:
            pass
        written = set()
        for name in new_files:
            with open(os.path.join(tmp, name), "rb") as f:
                dst = f"{tb_dir}/{name}"
                write_bytes(fs, dst, f.read())
                written.add(dst)
        for path in old:
            if path not in written:
                try:
                    fs.delete_file(path)
                except OSError:
                    pass
    return tb_dir


def plot_curves(history: Sequence[Mapping[str, Any]], selected_epoch: int | None = None,
                title: str | None = None) -> bytes:
    """A PNG (bytes) of the training curves: losses, validation MAE/Corr, accuracies, learning rates.

    Uses matplotlib's object API with the Agg canvas, never pyplot (whose global figure state breaks when seeds
    are trained in parallel threads), and a lock around the drawing for matplotlib's other shared caches."""
    with _PLOT_LOCK:
        return _plot_curves(history, selected_epoch, title)


def _plot_curves(history: Sequence[Mapping[str, Any]], selected_epoch: int | None, title: str | None) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]

    def series(key: str) -> list[float]:
        out = []
        for r in history:
            v = r.get(key)
            out.append(float("nan") if v is None else float(v))
        return out

    keys = set().union(*[set(r) for r in history]) if history else set()
    fig = Figure(figsize=(10, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    ax = axes[0][0]
    for k in sorted(keys):
        if k.startswith("train_") and k not in ("train_samples", "train_steps"):
            ax.plot(epochs, series(k), label=k, marker=".")
    if "val_loss" in keys:
        ax.plot(epochs, series("val_loss"), label="val_loss (L1)", marker="o", color="black")
    ax.set_title("losses")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for k in ("val_mae", "val_corr"):
        if k in keys:
            ax.plot(epochs, series(k), label=k, marker=".")
    ax.set_title("validation MAE / Corr")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    for k in sorted(keys):
        if k.startswith(("val_acc", "val_f1")):
            ax.plot(epochs, series(k), label=k, marker=".")
    ax.set_title("validation accuracies / F1")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    for k in sorted(keys):
        if k.startswith("lr_"):
            ax.plot(epochs, series(k), label=k, marker=".")
    ax.set_title("learning rates")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for a in axes.flat:
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if selected_epoch is not None:
            a.axvline(selected_epoch, color="grey", linestyle="--", linewidth=1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def write_predictions(fs, path: str, parts: Iterable[tuple[str, Sequence[str], Any, Any]]) -> None:
    """Parquet with columns sample_id (string), split, label (float32), prediction (float32).

    `parts`: (split, sample_ids, labels, predictions) per split."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, splits, labels, preds = [], [], [], []
    for split, sid, lab, pred in parts:
        sid = [str(s) for s in sid]
        ids += sid
        splits += [split] * len(sid)
        labels.append(np.asarray(lab, dtype=np.float32).reshape(-1))
        preds.append(np.asarray(pred, dtype=np.float32).reshape(-1))
    table = pa.table({
        "sample_id": pa.array(ids, pa.string()),
        "split": pa.array(splits, pa.string()),
        "label": pa.array(np.concatenate(labels) if labels else np.zeros(0, np.float32), pa.float32()),
        "prediction": pa.array(np.concatenate(preds) if preds else np.zeros(0, np.float32), pa.float32()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(fs, path, buf.getvalue())
