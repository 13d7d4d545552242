"""What a run leaves behind and shows: its output files, its result object, and its progress on the console.

    write_run_outputs(pf, ret) -> TrainResult   metrics.json (last), predictions.parquet, curves.png, tensorboard/,
                                                history.json, config.yaml, written by the driver after fit
    ProgressFiles                               rank 0's history.json + TensorBoard events after every epoch
    HistoryPrinter                              the driver's one line per epoch on a quiet embedded Ray
    metrics_table / format_record               the text a user reads
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from psamf.config import Config
    from psamf.preflight import Preflight

__all__ = ["TrainResult", "write_run_outputs", "read_run_outputs", "metrics_table", "floors_line", "chance_line",
           "chance_record", "format_record", "ProgressFiles", "HistoryPrinter", "git_sha", "code_version",
           "checkpoint_uri", "GIT_SHA_ENV"]

GIT_SHA_ENV = "PSAMF_GIT_SHA"  # the commit of a cluster run, set at submission where .git is not uploaded

log = logging.getLogger("psamf.results")


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


def format_record(rec: Mapping[str, Any], select: str) -> str:
    keys = ["train_total", "val_loss", "val_mae", "val_corr", "val_acc2_non0", select, "lr_bert", "lr_main",
            "samples_per_s_per_worker", "data_wait_frac"]
    seen, parts = set(), []
    for k in keys:
        if k in rec and k not in seen and isinstance(rec[k], (int, float)):
            seen.add(k)
            parts.append(f"{k}={rec[k]:.4g}")
    return " ".join(parts) + (" *best*" if rec.get("is_best") else "")



def metrics_table(metrics: Mapping[str, Any], splits: Sequence[str] = ("valid", "test")) -> str:
    """The metrics of `splits` side by side, one column each (`metrics[split]` holds a split's metrics, as in a
    run's metrics.json; accuracies/F1 in %, MAE/Corr/losses raw)."""
    splits = list(splits)
    keys = [k for k in metrics[splits[-1]] if k not in ("n", "n_non0")]
    lines = [f"{'metric':<10} " + " ".join(f"{s:>9}" for s in splits)]
    for k in keys:
        row = []
        for split in splits:
            v = metrics[split].get(k)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                row.append(f"{'nan':>9}")
            elif k.startswith(("acc", "f1")):
                row.append(f"{100 * v:>8.2f}%")
            else:
                row.append(f"{v:>9.4f}")
        lines.append(f"{k:<10} " + " ".join(row))
    lines.append(f"{'n':<10} " + " ".join(f"{metrics[s].get('n', 0):>9}" for s in splits))
    return "\n".join(lines)



def floors_line(baselines: Mapping[str, Any], split: str = "test") -> str:
    """One line of the input-free floors a model must beat on `split` (metrics.json `baselines[split]`)."""
    b = baselines
    parts = [f"MAE of predicting 0 = {b['mae_zero']:.4f}" if b.get("mae_zero") is not None else None,
             f"of the {split} mean = {b['mae_mean']:.4f}" if b.get("mae_mean") is not None else None]
    accs = [f"{label} {100 * b[k]:.2f}%" for k, label in (("acc2_has0", "Acc-2 Has0"), ("acc2_non0", "Acc-2 Non0"),
                                                          ("acc7", "Acc-7")) if b.get(k) is not None]
    line = ", ".join(p for p in parts if p)
    if accs:
        line += ("; " if line else "") + "majority class " + ", ".join(accs)
    return f"{split} floors (input-free predictors): {line}"


class ProgressFiles:
    """Rank 0's live files in the run directory: history.json and TensorBoard events (best effort)."""

    def __init__(self, storage: Sequence[Any] | None, name: str):
        self.target = None
        if storage:
            from psamf.storage import resolve

            st = resolve(storage[0], storage[1])
            self.target = (st.fs, st.run_dir(name))

    def step(self, epoch: int, step: int, total: int | None, seconds: float) -> str:
        """Within an epoch: progress.json for the driver's console, and the line for the job log."""
        eta = seconds / step * (total - step) if total and step < total else 0.0
        line = (f"epoch {epoch}: step {step}" + (f"/{total}" if total else "") + f", {seconds / step:.2f} s/step"
                + (f", epoch ETA {_duration(eta)}" if total else ""))
        if self.target is not None:
            from psamf.storage import write_json

            fs, run_dir = self.target
            try:
                write_json(fs, f"{run_dir}/progress.json", {"epoch": epoch, "step": step, "steps": total,
                                                            "seconds": seconds, "eta_s": eta, "line": line})
            except Exception as e:  # noqa: BLE001 - progress files must never kill training
                log.warning("could not write %s/progress.json: %s", run_dir, e)
        return line

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


class HistoryPrinter:
    """The driver's view of a run on a quiet embedded Ray (`runtime.quiet()`): worker logs are not streamed, so
    a background thread polls the run's history.json (written by rank 0 after each epoch) and prints every new
    epoch. Epochs already in the file when it starts (a resumed run) are not printed again."""

    def __init__(self, fs: Any, run_dir: str, select: str, interval_s: float = 1.0, out: Any = None):
        import threading

        self.fs, self.path, self.select, self.interval_s = fs, f"{run_dir}/history.json", select, interval_s
        self.progress_path, self.last_line = f"{run_dir}/progress.json", None
        self.name = run_dir.rstrip("/").rsplit("/", 1)[-1]
        self.out = out if out is not None else sys.stdout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="psamf-history-printer", daemon=True)
        self.seen = len(self._read())

    def _read(self) -> list[dict[str, Any]]:
        from psamf.storage import read_json

        try:
            hist = read_json(self.fs, self.path)
        except Exception:  # noqa: BLE001 - not written yet, or being replaced: try again next poll
            return []
        return hist if isinstance(hist, list) else []

    def poll(self) -> None:
        hist = self._read()
        for rec in hist[self.seen:]:
            print(f"  [{self.name}] epoch {rec.get('epoch')} ({rec.get('time_train_s', math.nan):.1f} s train): "
                  f"{format_record(rec, self.select)}", file=self.out, flush=True)
        self.seen = max(self.seen, len(hist))
        line = self._progress_line()
        if line and line != self.last_line:
            print(f"  [{self.name}] {line}", file=self.out, flush=True)
            self.last_line = line

    def _progress_line(self) -> str | None:
        """rank 0's latest in-epoch progress line (progress.json), if it belongs to an epoch not yet printed."""
        from psamf.storage import read_json

        try:
            p = read_json(self.fs, self.progress_path)
        except Exception:  # noqa: BLE001 - not written yet
            return None
        return p.get("line") if isinstance(p, dict) and int(p.get("epoch", -1)) >= self.seen else None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> "HistoryPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        (f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def git_sha() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> dict[str, Any]:
    """What code a run used: the git commit (from the checkout, else from $PSAMF_GIT_SHA, which a submission can
    set, since `ray job submit` does not upload .git), the package version, and the sha256 of the psamf source
    files (sorted relative paths and contents of psamf/**/*.py). The source hash is always there, so a cluster
    run without either can still be matched to a checkout (`python -c "from psamf.results import code_version;
    print(code_version())"` there)."""
    import hashlib

    from psamf import __version__

    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(f for f in filenames if f.endswith(".py")):
            full = os.path.join(dirpath, name)
            h.update(os.path.relpath(full, root).replace(os.sep, "/").encode() + b"\0")
            with open(full, "rb") as f:
                h.update(f.read() + b"\0")
    return {"git_sha": git_sha() or os.environ.get(GIT_SHA_ENV) or None, "psamf_version": __version__,
            "source_sha256": h.hexdigest()}


def write_run_outputs(pf: "Preflight", ret: Mapping[str, Any]) -> TrainResult:
    """metrics.json, predictions.parquet, curves.png, tensorboard/, history.json, config.yaml (driver)."""
    from psamf.metrics import trivial_baselines
    from psamf.outputs import plot_curves, write_history, write_predictions, write_tensorboard
    from psamf.storage import json_safe, write_bytes, write_json

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
        "terms_at_chance": chance_record(cfg, history),
        "selected_epoch_record": next((r for r in history if r["epoch"] == sel), None),
        "checkpoint": checkpoint_uri(st, ret.get("checkpoint_path")),
        "world_size": ret.get("world_size"), "amp": ret.get("amp"), "device": ret.get("device"),
        "batch": ret.get("batch"),  # per worker, gradient accumulation, workers, global
        "controller_poll_s": ret.get("controller_poll_s"),  # Ray Train's poll interval as the workers saw it
        "sessions": 1 + max((int(r.get("session", 0)) for r in history), default=0),
        **code_version(), "preset": cfg.preset,
    }
    paths = _output_paths(st, cfg.run.name)
    write_predictions(fs, f"{run_dir}/predictions.parquet",
                      [(s, ret[s]["ids"], ret[s]["label"], ret[s]["pred"]) for s in ("valid", "test")])
    write_history(fs, run_dir, history)
    write_tensorboard(fs, run_dir, history, final={"selected_epoch": sel, "test": ret["test"]["metrics"]})
    write_bytes(fs, f"{run_dir}/curves.png", plot_curves(history, sel, title=f"{cfg.run.name} (seed {o.seed})"))
    write_bytes(fs, f"{run_dir}/config.yaml", cfg.to_yaml().encode())
    write_json(fs, f"{run_dir}/metrics.json", metrics)  # last: its presence means the run's outputs are complete
    if metrics["checkpoint"]:
        paths["checkpoint"] = metrics["checkpoint"]
    safe = json_safe(metrics)
    return TrainResult(run_name=cfg.run.name, run_dir=st.run_uri(cfg.run.name), metrics=safe, paths=paths,
                       history=history, table=metrics_table(safe))


def chance_record(cfg: "Config", history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The contrastive terms' chance levels (`psamf.losses.chance_levels`: clm 2·ln B, ccl ln B / 2 or 0), each
    with its last train value and whether it stayed at that level in every epoch (`terms_at_chance`)."""
    from psamf.losses import CHANCE_RTOL, chance_levels, terms_at_chance

    levels = chance_levels(cfg)
    flags = terms_at_chance(history, levels, cfg.optim.batch_size)
    last = history[-1] if history else {}
    return {"rule": f"train value within {CHANCE_RTOL:g} x the level (ln B where it is 0) in every epoch, "
                    f"B = optim.batch_size = {cfg.optim.batch_size}", "batch_size": cfg.optim.batch_size,
            "terms": {t: {"level": lvl, "last": last.get(f"train_{t}"), "at_chance": flags.get(t)}
                      for t, lvl in levels.items()}}


def chance_line(metrics: Mapping[str, Any]) -> str | None:
    """One console line naming the loss terms that never left their chance level (metrics.json
    `terms_at_chance`), or None when there are none (or the run predates the record)."""
    rec = metrics.get("terms_at_chance") or {}
    terms = rec.get("terms") or {}
    hits = [f"train {t} {c['last']:.4f} (chance level {c['level']:.4f})" for t, c in terms.items()
            if c.get("at_chance") and c.get("last") is not None]
    if not hits:
        return None
    return (f"loss terms at their chance level in every epoch, at batch {rec.get('batch_size')} per worker (they "
            "taught the model nothing in this run): " + ", ".join(hits))


def _output_paths(st: Any, name: str) -> dict[str, str]:
    return {k: f"{st.run_uri(name)}/{v}" for k, v in {
        "metrics": "metrics.json", "predictions": "predictions.parquet", "curves": "curves.png",
        "tensorboard": "tensorboard", "history": "history.json", "config": "config.yaml"}.items()}


def read_run_outputs(pf: "Preflight", latest_epoch: int, *, early_stopped: bool = False) -> TrainResult | None:
    """The finished run's result as its last invocation wrote it, when its outputs are complete and describe its
    latest checkpoint (`latest_epoch`): metrics.json and history.json present, as many epochs recorded as
    checkpointed, and the selected checkpoint still there. Else None (the run must be evaluated again).
    `early_stopped`: the run has not reached `optim.epochs`; its result stands only when metrics.json says it
    stopped early under the current `optim.early_stop_patience` and `optim.epochs` (a resumed loop would stop again
    before training: its selector state is the one that stopped it)."""
    from psamf.checkpoint import CHECKPOINT_DIR
    from psamf.storage import exists, json_safe, read_json

    cfg, st = pf.cfg, pf.storage
    fs, run_dir = st.fs, st.run_dir(cfg.run.name)
    try:
        if not (exists(fs, f"{run_dir}/metrics.json") and exists(fs, f"{run_dir}/history.json")):
            return None
        metrics, history = read_json(fs, f"{run_dir}/metrics.json"), read_json(fs, f"{run_dir}/history.json")
        sel = metrics["selection"]
        ck = metrics.get("checkpoint")
        complete = (sel["epochs_trained"] == len(history) == latest_epoch + 1 and ck
                    and exists(fs, f"{run_dir}/{CHECKPOINT_DIR.format(epoch=int(sel['selected_epoch']))}/model.pt"))
        if early_stopped:
            complete = complete and (sel["early_stopped"] is True
                                     and sel["early_stop_patience"] == cfg.optim.early_stop_patience
                                     and sel["epochs_max"] == cfg.optim.epochs)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not complete:
        return None
    paths = {**_output_paths(st, cfg.run.name), "checkpoint": ck}
    safe = json_safe(metrics)
    return TrainResult(run_name=cfg.run.name, run_dir=st.run_uri(cfg.run.name), metrics=safe, paths=paths,
                       history=history, table=metrics_table(safe))


def checkpoint_uri(st: Any, fs_path: str | None) -> str | None:
    """A checkpoint's filesystem path as a URI the user can paste (s3://... when the storage is S3)."""
    if not fs_path:
        return None
    if st.uri.startswith("s3://") and not fs_path.startswith("s3://"):
        return "s3://" + fs_path.lstrip("/")
    return fs_path
