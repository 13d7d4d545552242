"""Run outputs: the files psamf writes into a run's directory, on top of `psamf.storage`.

Where a run lives is `psamf.storage.resolve(run.storage_path, run.s3_endpoint or data.s3_endpoint)`;
every write below goes through `psamf.storage.write_bytes` (atomic per file).

Outputs (all under `<storage_path>/<run.name>/`, next to Ray's `checkpoint_epoch=NNN/` folders and snapshot):

    config.yaml          resolved config of the latest invocation (driver, before any worker starts)
    history.json         one record per finished epoch, rewritten by rank 0 after every epoch, just before that
                         epoch's checkpoint is reported (a Tune scheduler may stop a trial at the report); a
                         restart from an earlier checkpoint rewrites the records after it, so each epoch that
                         counts is recorded once
    tensorboard/         one event file, rewritten from the history after every epoch (rank 0) and at the end
    metrics.json         selection, validation + test metrics of the selected checkpoint, baselines (driver, end)
    predictions.parquet  sample_id, split, label, prediction for valid and test (driver, end)
    curves.png           training curves (driver, end)

The TensorBoard file is replaced by writing the new file first, then deleting the old one, so a reader
never sees an empty directory (it may briefly see two files).
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import threading
from typing import Any, Iterable, Mapping, Sequence

from psamf.storage import write_bytes, write_json

__all__ = [
    "write_history",
    "write_tensorboard",
    "plot_curves",
    "write_predictions",
    "plot_confusion_7class",
    "plot_scatter",
]


_PLOT_LOCK = threading.Lock()


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
    if key in ("samples_per_s_per_worker", "data_wait_frac", "time_train_s", "time_eval_s", "time_setup_s",
               "grad_norm", "rss_gib", "peak_gpu_mem_gib"):
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


# --------------------------------------------------------------------------------------------
# Evaluation plots (`psamf evaluate`)
# --------------------------------------------------------------------------------------------


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def plot_confusion_7class(counts: Any, title: str | None = None) -> bytes:
    """A PNG (bytes) of a 7×7 confusion matrix (`psamf.metrics.confusion_7class`): counts in every cell, true
    class on the y axis, predicted class on the x axis. Agg canvas, no pyplot (see `plot_curves`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    import numpy as np

    from psamf.metrics import CLASSES_7

    counts = np.asarray(counts, dtype=np.int64)
    with _PLOT_LOCK:
        fig = Figure(figsize=(6.0, 5.2))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        im = ax.imshow(counts, cmap="Blues", vmin=0)
        fig.colorbar(im, ax=ax, label="samples")
        ticks = list(range(len(CLASSES_7)))
        ax.set_xticks(ticks, [str(c) for c in CLASSES_7])
        ax.set_yticks(ticks, [str(c) for c in CLASSES_7])
        ax.set_xlabel("predicted class (rounded, clipped to ±3)")
        ax.set_ylabel("true class (label rounded, clipped to ±3)")
        high = counts.max() / 2 if counts.size and counts.max() > 0 else 0
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if counts[i, j] > high else "black")
        ax.set_title(title or "7-class confusion matrix", fontsize=10)
        return _png(fig)


def plot_scatter(pred: Any, label: Any, title: str | None = None,
                 label_range: tuple[float, float] = (-3.0, 3.0)) -> bytes:
    """A PNG (bytes) of predictions against labels, one point per sample, with the identity line y = x (a perfect
    model's points lie on it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    import numpy as np

    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(label, dtype=np.float64).reshape(-1)
    lo = min(float(label_range[0]), float(p.min()) if p.size else 0.0)
    hi = max(float(label_range[1]), float(p.max()) if p.size else 0.0)
    with _PLOT_LOCK:
        fig = Figure(figsize=(5.5, 5.5))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.scatter(t, p, s=8, alpha=0.5, edgecolors="none")
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, linestyle="--", label="identity (y = x)")
        ax.set_xlim(lo - 0.1, hi + 0.1)
        ax.set_ylim(lo - 0.1, hi + 0.1)
        ax.set_aspect("equal")
        ax.set_xlabel("label")
        ax.set_ylabel("prediction")
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title(title or "prediction against label")
        return _png(fig)
