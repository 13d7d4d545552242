"""`psamf train` at the Ray edge: the per-worker function, the `TorchTrainer` builder, fit.

Plain PyTorch lives in `psamf.engine` (step, epoch, evaluation, selection), the checkpoint format in
`psamf.checkpoint`, the checks before anything starts in `psamf.preflight`, the run's files in `psamf.results`.
This module only adds Ray Train around them (style: a plain loop with Ray at the edges):

    train_fn_per_worker(loop_config)    get_dataset_shard, prepare_model (DDP), resume, report every epoch
    train_in_trial(loop_config, datasets) -> dict   the same loop in a Tune trial's own process, without Ray Train
    build_trainer(cfg, datasets, storage, counts=..., callbacks=...) -> TorchTrainer
    fit(pf, datasets=None, callbacks=()) -> TrainResult      one run: fit, then write its outputs
    train(cfg, seeds=None) -> TrainResult                    start/join Ray, preflight, fit (or one run per seed)

Validation runs every epoch over the **whole** split: every rank streams all of valid/test and evaluates a
disjoint part (a stable hash of the sample id, `engine.eval_partition`); predictions, labels and ids are gathered
from every rank, a sample seen twice or a count different from the manifest's is an error, and every rank
computes the same metrics from the same gathered arrays (so the scheduler and early stopping agree). After the
last epoch every rank loads the **selected** checkpoint (validation only) and evaluates valid and test once;
rank 0 returns the results, and the driver writes them (`psamf.results.write_run_outputs`).

Resume: every epoch rank 0 writes a checkpoint and every rank reports (a collective). A restart
(`FailureConfig(max_failures)`) or a re-run of the same `run.name` continues from the latest epoch through
`ray.train.get_checkpoint()`; Ray Train local mode (`run.num_workers=0`) persists and restores through
`psamf.checkpoint.LocalCheckpoints` instead. A run that has finished (all its epochs trained, or stopped early under
the same `optim.early_stop_patience` and `optim.epochs`) and written its outputs returns them when re-run, without
starting a worker (`psamf.results.read_run_outputs`); with incomplete outputs it trains no further epoch and
re-evaluates the selected checkpoint (same numbers). Raise `optim.epochs` (or the patience) to continue it.

Data start-up off the epochs: a worker starts its first training pass in a thread (`psamf.data.StartedEarly`)
before it builds the model (the resume epoch comes from the latest checkpoint's meta.json), and every later pass
once all ranks have finished the previous one, during its validation and checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from psamf import runtime
from psamf.checkpoint import (CHECKPOINT_DIR, CheckpointError, LocalCheckpoints, load_model_weights, open_checkpoint,
                              repair_run, save_checkpoint, verify_checkpoint)
from psamf.config import Config, ConfigError
from psamf.data import StartedEarly, iter_batches, load_datasets, split_config
from psamf.engine import (EvalOutput, Selector, all_gather, build_optimizer, build_scheduler, epoch_record,
                          eval_metrics, eval_partition, evaluate, gather_eval, make_scaler, maybe_compile,
                          memory_stats, release_memory, reset_gpu_peak, resolve_amp, rng_state, seed_everything,
                          set_rng_state, train_epoch)
from psamf.model import build_model
from psamf.preflight import (DATA_RECORD, Preflight, check_cluster_resources, check_placeholders, data_record,
                             preflight, read_manifest)
from psamf.results import (HistoryPrinter, ProgressFiles, TrainResult, format_record, read_run_outputs,
                           write_run_outputs)

__all__ = ["train_fn_per_worker", "train_in_trial", "build_loop_config", "build_trainer", "fit", "prepare_run", "train",
           "seed_config", "worker_device", "FAULT_ENV", "configure_worker_logging"]

log = logging.getLogger("psamf.train")

RAY_REPORT_LOGGER = "ray.train.v2._internal.execution.train_fn_utils"  # logs every ray.train.report() at INFO
FAULT_ENV = "PSAMF_FAULT_INJECT"  # testing hook: "rank=1,epoch=2,marker=/tmp/x" -> that rank os._exit(1)s once


# =============================================================================================
# The per-worker function
# =============================================================================================


def _fault_spec() -> dict[str, Any] | None:
    """The driver's FAULT_ENV as a dict (read in the driver: workers do not see its environment changes)."""
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    spec = dict(kv.split("=", 1) for kv in raw.split(","))
    return {"rank": int(spec["rank"]), "epoch": int(spec["epoch"]), "marker": spec["marker"]}


def _fault_hook(spec: Mapping[str, Any] | None, rank: int, epoch: int):
    """Testing hook (FAULT_ENV): the named rank exits hard once, after its first step of the named epoch."""
    if not spec or spec["rank"] != rank or spec["epoch"] != epoch or os.path.exists(spec["marker"]):
        return None

    def exit_once() -> None:
        with open(spec["marker"], "w") as f:
            f.write(f"rank {rank} exited at epoch {epoch}, pid {os.getpid()}\n")
        log.warning("fault injection: rank %d exits at epoch %d", rank, epoch)
        os._exit(1)

    return exit_once


class RayCheckpoints:
    """Checkpoints through Ray Train: restore from `get_checkpoint()`, report with a checkpoint every epoch, find
    the selected epoch among the checkpoints Ray kept. `LocalCheckpoints` offers the same three calls for local
    mode, where Ray neither persists nor restores."""

    def latest(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: Mapping[str, Any], local_dir: str | None, epoch: int, history: Sequence[Any]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(local_dir) if local_dir else None
        ray.train.report(dict(metrics), checkpoint=checkpoint, checkpoint_dir_name=CHECKPOINT_DIR.format(epoch=epoch))
        # The controller registers a report asynchronously: a worker dying right after `report` returned could lose
        # the registration (the upload is there, the run snapshot does not name it), and the restart would retrain
        # this epoch. Wait until it is registered and in the snapshot.
        ray.train.get_all_reported_checkpoints()

    def selected(self, epoch: int) -> Any:
        import ray.train

        kept = [r for r in ray.train.get_all_reported_checkpoints() if int(r.metrics.get("epoch", -1)) == epoch]
        if not kept:
            raise RuntimeError(f"the checkpoint of the selected epoch {epoch} is not among the checkpoints Ray kept")
        return kept[-1].checkpoint


class _LocalModeCheckpoints(LocalCheckpoints):
    """`LocalCheckpoints` with the report to Ray Train's local-mode session (which keeps nothing itself)."""

    def report(self, metrics: Mapping[str, Any], local_dir: str | None, epoch: int, history: Sequence[Any]) -> None:
        import ray.train

        if local_dir:
            self.save(local_dir, epoch, history)
        ray.train.report(dict(metrics))

    def selected(self, epoch: int) -> Any:
        import ray.train

        path = self.path(epoch)
        if path is None:
            raise RuntimeError(f"the checkpoint of the selected epoch {epoch} is not in {self.run_dir}")
        return ray.train.Checkpoint(path, filesystem=self.fs)


class _TrialCheckpoints(_LocalModeCheckpoints):
    """`LocalCheckpoints` of a Tune trial that trains in its own process (`train_in_trial`). With `to_tune` every
    epoch's metrics go to Ray Tune, with the checkpoint's path, as `TuneReportCallback` forwards them from a worker
    group (a search's trials); without, the trial reports once itself (a study grid's)."""

    def __init__(self, *args: Any, to_tune: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.to_tune = to_tune

    def report(self, metrics: Mapping[str, Any], local_dir: str | None, epoch: int, history: Sequence[Any]) -> None:
        if local_dir:
            self.save(local_dir, epoch, history)
        if self.to_tune:
            import ray.tune

            path = self.path(epoch)
            ray.tune.report({**metrics, **({"checkpoint_path": path} if path else {})})


@dataclass
class _WorkerEnv:
    """What the training loop needs from whatever runs it: its rank and world size, its device, the datasets (a
    Ray Train shard or a whole Ray Dataset), the model wrapper (DDP or none) and the checkpoint store."""

    rank: int
    world: int
    device: torch.device
    shard: Callable[[str], Any]
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module]
    store: Any


@dataclass
class _Resumed:
    start_epoch: int = 0
    session: int = 0
    resumed_from: int | None = None
    history: list | None = None
    state: dict | None = None  # train_state.pt


def _next_epoch_hint(ckpt: Any) -> int:
    """The epoch a run resumes at from `ckpt` (a Ray `Checkpoint` or None), read from its small meta.json without
    downloading the rest; 0 without a checkpoint, -1 when meta.json cannot be read (`_restore` then reports the
    damage). Lets a worker start its first pass before the model exists (`psamf.data.StartedEarly`)."""
    if ckpt is None:
        return 0
    try:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path.rstrip('/')}/meta.json") as f:
            return int(json.loads(f.read())["epoch"]) + 1
    except Exception:  # noqa: BLE001 - a hint only
        return -1


def _restore(ckpt: Any, model: torch.nn.Module, selector: Selector) -> _Resumed:
    """Load checkpoint `ckpt`'s weights and selection state, if any (before DDP wraps the model)."""
    import pyarrow.fs as pafs

    if ckpt is None:
        return _Resumed(history=[])
    with open_checkpoint(ckpt) as d:
        problems = verify_checkpoint(pafs.LocalFileSystem(), d)  # repair_run ran in the driver; damage since then
        if problems:
            raise CheckpointError(f"cannot resume from {ckpt.path}: {'; '.join(problems)}")
        load_model_weights(d, model, name=ckpt.path)
        state = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=True)
    selector.load_state_dict(state["selector"])
    return _Resumed(start_epoch=int(state["epoch"]) + 1, session=int(state.get("session", 0)) + 1,
                    resumed_from=int(state["epoch"]), history=json.loads(state["history"]), state=state)


def _restore_optim(res: _Resumed, optimizer: Any, scheduler: Any, seed: int, rank: int, world: int,
                   scaler: Any = None) -> None:
    """Optimizer, scheduler, float16 loss scaler and this rank's RNG streams from the restored state (fresh
    streams without one)."""
    if res.state is None:
        seed_everything(seed + rank)  # per-rank dropout streams
        return
    optimizer.load_state_dict(res.state["optimizer"])
    if res.state.get("scheduler") is not None:
        scheduler.load_state_dict(res.state["scheduler"])
    if scaler is not None and res.state.get("scaler"):
        scaler.load_state_dict(res.state["scaler"])
    rngs = res.state.get("rng") or []
    if len(rngs) == world:
        set_rng_state(rngs[rank])
    else:  # a different world size: fresh per-rank streams, deterministic in (seed, epoch, rank)
        seed_everything(seed + 1000 * res.start_epoch + rank)


def configure_worker_logging() -> None:
    """psamf's INFO lines (one per epoch, resume, timings) on the worker's stderr, everything else at WARNING.

    The worker's stderr is the job log on a cluster. Ray 2.60 Train logs one "Reporting training result ..." INFO
    line per rank and epoch through a logger named by its file path (`logging.getLogger(__file__)`), whose level
    is the root logger's: so the root stays at WARNING and psamf gets its own handler (no colour codes)."""
    import sys

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    root.setLevel(logging.WARNING)
    plog = logging.getLogger("psamf")
    plog.setLevel(logging.INFO)
    plog.propagate = False
    if not any(getattr(h, "_psamf_worker", False) for h in plog.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        h._psamf_worker = True  # type: ignore[attr-defined]
        plog.addHandler(h)


def worker_device() -> torch.device:
    """The device Ray Train assigned to this worker (the first one if several)."""
    import ray.train.torch

    dev = ray.train.torch.get_device()
    return dev[0] if isinstance(dev, list) else dev


PROGRESS_INTERVAL_S = float(os.environ.get("PSAMF_PROGRESS_S", "30"))  # in-epoch progress lines, rank 0


def _step_progress(progress: ProgressFiles | None, epoch: int, n_train: int | None, batch_size: int, world: int):
    """Rank 0's in-epoch progress: every PROGRESS_INTERVAL_S seconds a line in the worker log (the job log on a
    cluster) and progress.json (printed by the driver on the embedded Ray): step, s/step, the epoch's ETA."""
    if progress is None:
        return None
    total = int(n_train) // (batch_size * world) if n_train else None  # full batches per rank (drop_last)
    last = [0.0]

    def on_step(step: int, seconds: float) -> None:
        if seconds - last[0] >= PROGRESS_INTERVAL_S:
            last[0] = seconds
            log.info("%s", progress.step(epoch, step, total, seconds))

    return on_step


def _checkpoint_epoch(store: Any, rank: int, rec: dict, *, model, optimizer, scheduler, selector, history,
                      cfg: Config, session: int, scaler: Any = None) -> None:
    """Rank 0 writes the epoch's checkpoint; every rank reports (a collective)."""
    rngs = all_gather(rng_state())
    with tempfile.TemporaryDirectory(prefix="psamf-ckpt-") as tmp:
        if rank == 0:
            save_checkpoint(tmp, model=model, optimizer=optimizer, scheduler=scheduler, selector=selector,
                            epoch=rec["epoch"], history=history, cfg=cfg, rng_states=rngs, session=session,
                            metrics=rec, scaler=scaler)
        store.report({k: v for k, v in rec.items() if v is not None}, tmp if rank == 0 else None, rec["epoch"],
                     history)


def train_fn_per_worker(loop_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function. `loop_config`: {"config": Config dict, "counts": {split: n},
    "storage": (storage_path, s3_endpoint) of the run, for rank 0's progress files and local-mode checkpoints,
    "final_splits": the splits the selected checkpoint is evaluated on at the end (default valid and test; a Tune
    trial passes only valid: test is looked at once, for the search's best trial)}."""
    import ray.train
    import ray.train.torch

    t_fn = time.perf_counter()
    cfg = Config.from_dict(loop_config["config"], source="train_loop_config")
    ctx = ray.train.get_context()
    if cfg.run.num_workers > 0:  # local mode runs in the driver, whose logging is the command's business
        configure_worker_logging()
    else:  # but Ray's "Reported metrics: {...}" INFO line per epoch repeats what psamf prints
        logging.getLogger(RAY_REPORT_LOGGER).setLevel(logging.WARNING)
    selector = _selector(cfg)
    store = (_LocalModeCheckpoints(loop_config["storage"], cfg.run.name, cfg.run.keep_checkpoints, selector)
             if cfg.run.num_workers == 0 else RayCheckpoints())
    env = _WorkerEnv(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=worker_device(),
                     shard=ray.train.get_dataset_shard, prepare_model=ray.train.torch.prepare_model, store=store)
    return _train_loop(loop_config, cfg, env, selector, t_fn)


def train_in_trial(loop_config: Mapping[str, Any], datasets: Mapping[str, Any], *,
                   report_epochs: bool = True) -> dict[str, Any]:
    """The training loop in a Ray Tune trial's own process, without Ray Train (`workers_per_trial: 0` in a search,
    `run.num_workers=0` in a study grid): one rank, the whole datasets, the trial's device (the GPU Ray gave the
    trial when `run.use_gpu`), checkpoints in the run directory as in local mode (`LocalCheckpoints`: a restarted
    trial resumes them), every epoch reported to Tune when `report_epochs`. Ray 2.60 refuses `ray.train.*` calls
    inside a Tune function, and a trial of one process needs no worker group: starting one (controller, worker
    actor, dataset split) is most of a short trial. Returns what rank 0 of `train_fn_per_worker` returns."""
    t_fn = time.perf_counter()
    cfg = Config.from_dict(loop_config["config"], source="train_loop_config")
    if cfg.run.use_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"run.use_gpu=true, but the trial's process sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    configure_worker_logging()
    selector = _selector(cfg)
    device = torch.device("cuda", 0) if cfg.run.use_gpu else torch.device("cpu")  # Ray set the visible GPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = _TrialCheckpoints(loop_config["storage"], cfg.run.name, cfg.run.keep_checkpoints, selector,
                              to_tune=report_epochs)
    env = _WorkerEnv(rank=0, world=1, device=device, shard=lambda name: datasets[name],
                     prepare_model=lambda m: m.to(device), store=store)
    try:
        out = _train_loop(loop_config, cfg, env, selector, t_fn)
    finally:
        env = None  # the process may train the next trial: give back what this one held
        release_memory()
    assert out is not None  # rank 0
    return out


def _selector(cfg: Config) -> Selector:
    return Selector(cfg.optim.select_metric, cfg.optim.select_mode, cfg.optim.early_stop_patience)


def _train_loop(loop_config: Mapping[str, Any], cfg: Config, env: _WorkerEnv, selector: Selector,
                t_fn: float) -> dict[str, Any] | None:
    """The loop of `train_fn_per_worker` and `train_in_trial`: set-up, epochs, the selected checkpoint's final
    evaluation; rank 0 returns the run's results."""
    rank, world, device, store = env.rank, env.world, env.device, env.store
    amp_dtype = resolve_amp(cfg.optim.amp, device)
    scaler = make_scaler(amp_dtype, device)
    counts = loop_config.get("counts") or {}
    latest = store.latest()
    train_shard = env.shard("train")
    # Host batches, page-locked for a GPU; the engine moves them (asynchronously) and evaluation reads its labels
    # from the host copy instead of the device.
    host_batches = {"device": "cpu", "pin_memory": device.type == "cuda"}

    def train_pass(epoch: int) -> Any:
        return iter_batches(train_shard, cfg.data, cfg.optim.batch_size, epoch=epoch, train=True, **host_batches)

    # The first pass starts now, in a thread, and its pipeline start-up (seconds) overlaps the model's build,
    # restore and DDP wrap below; each later pass starts during the previous epoch's validation (docs/benchmarks.md,
    # "The first epoch of a worker session").
    first = _next_epoch_hint(latest)
    early = StartedEarly(train_pass(first)) if 0 <= first < cfg.optim.epochs else None

    seed_everything(cfg.optim.seed)  # same init on every rank (DDP broadcasts rank 0's anyway)
    raw = build_model(cfg.model)
    res = _restore(latest, raw, selector)
    history = res.history
    if early is not None and first != res.start_epoch:  # meta.json and train_state.pt disagree: start afresh
        log.warning("checkpoint meta.json says epoch %d, train_state.pt %d", first - 1, res.start_epoch - 1)
        early.close()
        early = None
    maybe_compile(raw, cfg.optim)  # after the restore; in place, so `raw` (evaluation) is the compiled module too
    model = env.prepare_model(raw)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    _restore_optim(res, optimizer, scheduler, cfg.optim.seed, rank, world, scaler)
    if rank == 0 and res.resumed_from is not None:
        log.info("resumed %s from epoch %d (session %d)", cfg.run.name, res.resumed_from, res.session)

    final_splits = tuple(loop_config.get("final_splits") or ("valid", "test"))
    eval_shards = {s: env.shard(s) for s in dict.fromkeys(("valid", *final_splits))}
    keep = None if world == 1 else eval_partition(rank, world)
    progress = ProgressFiles(loop_config.get("storage"), cfg.run.name) if rank == 0 else None

    def run_eval(split: str) -> EvalOutput:
        batches = iter_batches(eval_shards[split], cfg.data, cfg.optim.batch_size, epoch=0, train=False,
                               **host_batches)
        out = gather_eval(evaluate(raw, batches, cfg, device=device, amp_dtype=amp_dtype, keep=keep))
        if counts.get(split) is not None and out.n != counts[split]:
            raise RuntimeError(f"{split}: evaluated {out.n} samples across {world} worker(s), the split has "
                               f"{counts[split]}: samples were dropped")
        return out

    t_setup = time.perf_counter() - t_fn
    if rank == 0:
        log.info("worker setup (model, optimizer, resume) took %.1f s; training epochs %d..%d",
                 t_setup, res.start_epoch, cfg.optim.epochs - 1)
    try:
        for epoch in range(res.start_epoch, cfg.optim.epochs):
            if selector.should_stop:
                break
            if early is not None and epoch == first:
                batches, early = early, None
            else:
                batches = train_pass(epoch)
            reset_gpu_peak(device)
            mine = train_epoch(model, batches, optimizer, cfg, device=device, amp_dtype=amp_dtype, scaler=scaler,
                               after_first_step=_fault_hook(loop_config.get("fault"), rank, epoch),
                               where=f"epoch {epoch}, rank {rank}, ",
                               on_step=_step_progress(progress, epoch, counts.get("train"), cfg.optim.batch_size,
                                                      world))
            rec = epoch_record(epoch, mine, all_gather(mine), optimizer)  # every rank has finished its pass
            if epoch + 1 < cfg.optim.epochs:  # the next pass starts during validation and checkpointing
                first = epoch + 1
                early = StartedEarly(train_pass(first))
            t_eval = time.perf_counter()
            rec.update(eval_metrics(run_eval("valid"), cfg.data.dataset, "val_"))
            rec["time_eval_s"] = time.perf_counter() - t_eval
            rec.update({"world_size": world, "session": res.session, "resumed_from": res.resumed_from,
                        "time_setup_s": t_setup,  # this session's worker set-up before its first epoch (this rank)
                        "ended_at": time.time(),  # wall clock after validation: differences give the epoch period
                        **memory_stats(device)})  # this rank's resident set; the epoch's peak GPU memory
            scheduler.step(rec["val_loss"])
            rec["is_best"] = selector.update(epoch, rec[cfg.optim.select_metric])
            rec["best_epoch"] = selector.best_epoch
            history.append(rec)
            if progress is not None:  # before the report: a Tune scheduler may stop the trial as soon as it reports
                progress.write(history)
            _checkpoint_epoch(store, rank, rec, model=raw, optimizer=optimizer, scheduler=scheduler,
                              selector=selector, history=history, cfg=cfg, session=res.session, scaler=scaler)
            if progress is not None:
                log.info("epoch %d (%.1f s): %s", epoch, rec["time_train_s"] + rec["time_eval_s"],
                         format_record(rec, cfg.optim.select_metric))
                if selector.should_stop:
                    log.info("early stop after epoch %d: no strict improvement of %s for %d epochs (best epoch %s)",
                             epoch, selector.metric, selector.bad_epochs, selector.best_epoch)
    except BaseException:
        # A Tune stop of an in-process trial ends here too (SystemExit at its report), and Tune may reuse the actor
        # for the next trial: end the pass started for the next epoch. Only with one rank: with several, its first
        # batch may wait for the other ranks' passes, and a failing rank must not hang on that.
        if early is not None and world == 1:
            early.close()
        raise
    if early is not None:  # stopped early (in this session or an earlier one): the pass started is not needed
        early.close()
    if selector.best_epoch is None:
        raise RuntimeError("no epoch was trained (optim.epochs reached before any epoch?)")

    # ---- the selected checkpoint: evaluated once on final_splits (valid + test; valid only in a Tune trial) ----
    selected = store.selected(selector.best_epoch)
    with open_checkpoint(selected) as d:
        load_model_weights(d, raw)
    final = {split: run_eval(split) for split in final_splits}
    if rank != 0:
        return None
    log.info("selected epoch %d evaluated on %s (worker total %.1f s)", selector.best_epoch,
             " + ".join(final_splits), time.perf_counter() - t_fn)
    return {
        "history": history, "selected_epoch": selector.best_epoch, "selector": selector.state_dict(),
        "early_stopped": selector.should_stop, "checkpoint_path": selected.path, "world_size": world,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off", "device": str(device),
        "batch": {"per_worker": cfg.optim.batch_size, "grad_accum": cfg.optim.grad_accum, "workers": world,
                  "global": cfg.optim.batch_size * cfg.optim.grad_accum * world},
        # what the controller passed on to this worker (Ray propagates it): the poll interval the run really had
        "controller_poll_s": (float(os.environ[runtime.POLL_ENV])
                              if cfg.run.num_workers > 0 and runtime.POLL_ENV in os.environ else None),
        **{split: {"ids": out.ids, "pred": out.pred.tolist(), "label": out.label.tolist(),
                   "metrics": eval_metrics(out, cfg.data.dataset, "")} for split, out in final.items()},
    }


# =============================================================================================
# The driver
# =============================================================================================


def build_loop_config(cfg: Config, storage: Any, *, counts: Mapping[str, int] | None = None,
                      final_splits: Sequence[str] = ("valid", "test"),
                      fault: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `loop_config` of `train_fn_per_worker` and `train_in_trial` (see `train_fn_per_worker`). `fault`: the
    FAULT_ENV testing hook as read by a process whose environment the caller does not share (a Tune trial's
    driver: the search's driver reads it); by default this process's FAULT_ENV."""
    from psamf.storage import absolute_model_paths

    return {
        "config": absolute_model_paths(cfg).to_dict(),  # workers run in other working directories
        "counts": {s: int(n) for s, n in (counts or {}).items()},
        "storage": (cfg.run.storage_path if "://" in cfg.run.storage_path else storage.root,
                    cfg.run.s3_endpoint or cfg.data.s3_endpoint),
        "final_splits": list(final_splits),
        "fault": dict(fault) if fault else _fault_spec(),
    }


def build_trainer(cfg: Config, datasets: Mapping[str, Any], storage: Any, *,
                  counts: Mapping[str, int] | None = None, callbacks: Sequence[Any] = (),
                  final_splits: Sequence[str] = ("valid", "test")):
    """The `TorchTrainer` of one run: `datasets` ({"train", "valid", "test"} Ray datasets; "test" only when it is in
    `final_splits`), `storage` (the resolved `run.storage_path`), `counts` (the split sizes each evaluation must
    cover), `callbacks` for Ray Train's `RunConfig` (Ray Tune's `TuneReportCallback` when a Tune trial drives the
    run), `final_splits` (what the selected checkpoint is evaluated on after training)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    run_config = ray.train.RunConfig(
        name=cfg.run.name, storage_path=storage.storage_path, storage_filesystem=storage.storage_filesystem,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                               controller_failure_limit=cfg.run.controller_failure_limit),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                                     checkpoint_score_attribute=cfg.optim.select_metric,
                                                     checkpoint_score_order=cfg.optim.select_mode),
        callbacks=list(callbacks) or None,
    )
    loop_config = build_loop_config(cfg, storage, counts=counts, final_splits=final_splits)
    return TorchTrainer(train_fn_per_worker, train_loop_config=loop_config, datasets=dict(datasets),
                        dataset_config=split_config(),
                        scaling_config=ray.train.ScalingConfig(**cfg.run.scaling_kwargs()),
                        run_config=run_config)


def _trim_history(fs: Any, run_dir: str, resume_epoch: int | None) -> None:
    """history.json without the epochs after the checkpoint the run resumes from (those of a checkpoint that was
    set aside as damaged): the run trains them again, and each epoch is recorded once."""
    from psamf.outputs import write_history
    from psamf.storage import exists, read_json

    path = f"{run_dir}/history.json"
    if not exists(fs, path):
        return
    hist = read_json(fs, path)
    keep = [r for r in hist if resume_epoch is not None and int(r.get("epoch", -1)) <= resume_epoch]
    if len(keep) != len(hist):
        write_history(fs, run_dir, keep)


def prepare_run(pf: Preflight) -> TrainResult | None:
    """Where a run stands, from its storage alone (no Ray): damaged checkpoints set aside and Ray's run snapshot
    made consistent with the checkpoint directories left (`repair_run`), the history trimmed to them, and the
    resume logged. Returns the stored result of a run that has finished, by training all its epochs or by stopping
    early under the same `optim.early_stop_patience` and `optim.epochs`, and written complete outputs
    (`psamf.results.read_run_outputs`: nothing to do), else None."""
    cfg, st = pf.cfg, pf.storage
    run_dir = st.run_dir(cfg.run.name)
    resume_epoch = repair_run(st.fs, run_dir, ray_train=cfg.run.num_workers > 0)
    _trim_history(st.fs, run_dir, resume_epoch)
    if resume_epoch is None:
        return None
    all_epochs = resume_epoch + 1 >= cfg.optim.epochs
    done = read_run_outputs(pf, resume_epoch, early_stopped=not all_epochs)
    if done is not None:  # a resubmitted job that had finished: no worker to start, nothing rewritten
        sel = done.metrics["selection"]
        how = (f"has trained all {cfg.optim.epochs} epochs" if all_epochs else
               f"stopped early after epoch {resume_epoch} ({sel['metric']} without a strict improvement for "
               f"{cfg.optim.early_stop_patience} epochs)")
        hint = ("raise optim.epochs to continue it" if all_epochs else
                "raise optim.early_stop_patience (or set it to null) to continue it")
        log.info("run %s %s and its outputs are complete (%s/metrics.json): nothing to do; %s, choose a new run "
                 "name, or `psamf evaluate` it again", cfg.run.name, how, st.run_uri(cfg.run.name), hint)
        return done
    if all_epochs:
        log.info("run %s has trained all %d epochs (%s) but its outputs are incomplete: its selected checkpoint is "
                 "evaluated again", cfg.run.name, cfg.optim.epochs, st.run_uri(cfg.run.name))
    else:
        log.info("run %s: resuming from the checkpoint of epoch %d (%s/%s)", cfg.run.name, resume_epoch,
                 st.run_uri(cfg.run.name), CHECKPOINT_DIR.format(epoch=resume_epoch))
    return None


def fit(pf: Preflight, *, datasets: Mapping[str, Any] | None = None, callbacks: Sequence[Any] = (),
        in_trial: bool = False, prepared: bool = False) -> TrainResult:
    """Fit one run (one seed) and write its outputs. `pf` comes from `preflight`; `datasets` default to the
    manifest's splits (`psamf.data.load_datasets`). `in_trial`: this is a Ray Tune trial's function (a study
    grid's), where a run with `run.num_workers=0` trains in this process through `train_in_trial` (Ray Train's
    local mode refuses to run in a Tune function). `prepared`: the caller has called `prepare_run(pf)` and it
    returned None."""
    from psamf.storage import write_bytes, write_json

    cfg, st = pf.cfg, pf.storage
    run_dir = st.run_dir(cfg.run.name)
    done = None if prepared else prepare_run(pf)
    if done is not None:
        return done
    # the resolved config goes into the run directory before any worker starts (the resume guard, once the run
    # has a checkpoint: preflight lets a run name without one be reused)
    write_bytes(st.fs, f"{run_dir}/config.yaml", cfg.to_yaml().encode())
    write_json(st.fs, f"{run_dir}/{DATA_RECORD}", data_record(cfg, pf.manifest))  # the resume check's record
    t0 = time.perf_counter()
    if datasets is None:
        datasets = load_datasets(cfg.data, pf.manifest)
    t1 = time.perf_counter()
    if in_trial and cfg.run.num_workers == 0:
        ret = train_in_trial(build_loop_config(cfg, st, counts=pf.manifest.get("counts")), datasets,
                             report_epochs=False)
        out = write_run_outputs(pf, ret)
        log.info("run %s: datasets %.1f s, training in the trial %.1f s", cfg.run.name, t1 - t0,
                 time.perf_counter() - t1)
        return out
    trainer = build_trainer(cfg, datasets, st, counts=pf.manifest.get("counts"), callbacks=callbacks)
    # local mode runs the loop in this process, so its log lines already reach the console
    printer = (HistoryPrinter(st.fs, run_dir, cfg.optim.select_metric)
               if runtime.quiet() and cfg.run.num_workers > 0 else contextlib.nullcontext())
    with printer:
        result = runtime.fit_trainer(trainer, cfg.run.controller_poll_s, what=f"run {cfg.run.name}")
    t2 = time.perf_counter()
    if result.error is not None:
        raise result.error
    if not result.return_value:
        raise RuntimeError(f"run {cfg.run.name}: rank 0 returned nothing (result: {result})")
    out = write_run_outputs(pf, result.return_value)
    log.info("run %s: datasets %.1f s, fit %.1f s, outputs %.1f s", cfg.run.name, t1 - t0, t2 - t1,
             time.perf_counter() - t2)
    return out


def seed_config(cfg: Config, seed: int) -> Config:
    """The config of one seed of a multi-seed run: `optim.seed=seed`, `run.name=<name>-seed<seed>`."""
    return cfg.replace({"optim.seed": seed, "run.name": f"{cfg.run.name}-seed{seed}"})


def train(cfg: Config, *, seeds: Sequence[int] | None = None) -> TrainResult:
    """Train one run (or one run per seed) and write every output. Starts or joins Ray (`runtime.init_ray`).
    Every config is checked (`preflight`) before any worker starts."""
    check_placeholders(cfg)  # before Ray starts: such a config could only fail later, obscurely
    manifest = read_manifest(cfg.data.uri, cfg.data.s3_endpoint)  # no data set: fail before Ray starts
    if not seeds:
        pf = preflight(cfg, manifest=manifest, check_resources=False)  # data, storage, resume: before Ray starts
        done = prepare_run(pf)
        if done is not None:  # finished, outputs complete: no Ray to start
            return done
        runtime.init_ray(cfg.run.reserved_cpus())
        check_cluster_resources(pf.cfg)  # the one check that needs Ray
        return fit(pf, prepared=True)
    from psamf.study import train_seeds  # its grid checks every run, then starts Ray

    return train_seeds(cfg, seeds)
