"""Ray Train integration: 2 DDP workers (gloo, CPU) on synthetic MOSI-shaped shards, one shared local Ray.

* S3 (moto): data and run storage in a bucket; the model learns (validation MAE below predict-the-mean); every
  output is written; the best k + latest checkpoints are kept.
* A worker killed mid-run (rank 1 `os._exit(1)` once at epoch 2) is restarted from the latest checkpoint and the
  run finishes with every epoch recorded exactly once.
* Re-running an interrupted run name resumes from its latest checkpoint — also when `num_to_keep=1` keeps only
  the best by the selection metric plus the latest. (A finished run re-run with more epochs continues: through Ray
  Train in test_jobs.py's resubmission, in local mode below.)
* Evaluating a checkpoint on 2 workers equals evaluating it in one process, sample by sample.
* A bad configuration fails with ConfigError before any worker starts.
"""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest

from psamf import checkpoint, engine, preflight, results
from psamf import train as T
from psamf.commands import train as train_cmd
from psamf.config import Config, ConfigError

pytestmark = pytest.mark.integration

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def shards(synthetic_shards):
    return synthetic_shards


def _cfg(shards_uri: str, storage: str, name: str, *extra: str) -> Config:
    return Config.from_preset("tiny").override([
        f"data.uri={shards_uri}", f"run.storage_path={storage}", f"run.name={name}", "run.num_workers=2",
        "optim.epochs=4", *extra])


def _split_ids(shards_dir: str, split: str) -> list[str]:
    import pyarrow.parquet as pq

    from psamf.shards import read_manifest

    files = [s["path"] for s in read_manifest(shards_dir)["shards"] if s["split"] == split]
    return sorted(i for f in files for i in pq.read_table(os.path.join(shards_dir, f), columns=["sample_id"])
                  .column("sample_id").to_pylist())


def _epochs(history) -> list[int]:
    return [r["epoch"] for r in history]


# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_run(ray_cluster, s3_server, shards):
    """Data and run storage in S3 (moto); 2 DDP workers; rank 1 exits hard once, mid-epoch 1, and
    FailureConfig(max_failures=1) restarts the worker group from the latest checkpoint. One fit for the module
    (a fresh bucket, like the `s3_bucket` fixture, but module-scoped)."""
    import uuid

    import boto3
    import pyarrow.fs as pafs

    from psamf.storage import s3_filesystem

    local, man = shards
    bucket = f"psamf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = s3_filesystem(s3_server)
    pafs.copy_files(local, f"{bucket}/shards", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    marker = os.path.join(os.path.dirname(local), f"fault-{bucket}")
    cfg = _cfg(f"s3://{bucket}/shards", f"s3://{bucket}/runs", "s3run", f"data.s3_endpoint={s3_server}",
               "run.keep_checkpoints=2", "run.max_failures=1", "optim.epochs=3")
    mp = pytest.MonkeyPatch()
    mp.setenv(T.FAULT_ENV, f"rank=1,epoch=1,marker={marker}")
    try:
        res = T.train(cfg)
    finally:
        mp.undo()
    return res, fs, bucket, marker


@pytest.mark.slow
def test_two_worker_ddp_on_s3_learns_and_writes_every_output(s3_run, shards):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from psamf.storage import exists, read_bytes, read_json

    res, fs, bucket, _ = s3_run
    local, man = shards
    m = res.metrics
    assert res.run_dir == f"s3://{bucket}/runs/s3run"
    assert _epochs(res.history) == [0, 1, 2] and m["world_size"] == 2
    # run.controller_poll_s reached the controller, which passed it on to the workers (Ray's default is 2 s)
    assert m["controller_poll_s"] == Config.from_preset("tiny").run.controller_poll_s == 0.25
    # it learns: validation MAE of the selected checkpoint below the predict-the-mean floor
    assert m["valid"]["mae"] < m["baselines"]["valid"]["mae_mean"] - 0.1, (m["valid"], m["baselines"]["valid"])
    assert m["valid"]["n"] == man["counts"]["valid"] and m["test"]["n"] == man["counts"]["test"]
    sel = m["selection"]["selected_epoch"]
    assert m["selection"]["metric"] == "val_loss"
    assert m["valid"]["mae"] == pytest.approx(res.history[sel]["val_mae"], abs=1e-5)  # re-evaluated = recorded
    # every epoch records rank 0's resident set (a worker process holds torch, Ray and the model: 0.2-8 GiB);
    # peak GPU memory only on a GPU
    assert all(0.2 < r["rss_gib"] < 8 and "peak_gpu_mem_gib" not in r for r in res.history), res.history

    run = f"{bucket}/runs/s3run"
    for name in ("metrics.json", "predictions.parquet", "curves.png", "history.json", "config.yaml"):
        assert exists(fs, f"{run}/{name}"), name
    tb = fs.get_file_info(pafs.FileSelector(f"{run}/tensorboard"))
    assert len(tb) == 1 and tb[0].base_name.startswith("events.out.tfevents")
    assert read_json(fs, f"{run}/metrics.json")["selection"]["selected_epoch"] == sel
    assert read_json(fs, f"{run}/data.json")["data_version"] == man["data_version"]  # what a resume must match
    assert Config.from_dict(__import__("yaml").safe_load(read_bytes(fs, f"{run}/config.yaml"))).run.name == "s3run"
    with fs.open_input_file(f"{run}/predictions.parquet") as f:
        pred = pq.read_table(f).to_pandas()
    for split in ("valid", "test"):
        ids = sorted(pred.loc[pred.split == split, "sample_id"])
        assert ids == _split_ids(local, split)  # every sample exactly once
    # checkpoints: best 2 by val_loss + the latest; the selected one among them, with its full state
    ckpts = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(run))
                   if i.base_name.startswith("checkpoint_"))
    assert 2 <= len(ckpts) <= 3 and f"checkpoint_epoch={sel:03d}" in ckpts and "checkpoint_epoch=002" in ckpts
    files = {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{run}/checkpoint_epoch=002"))}
    assert {"model.pt", "train_state.pt", "config.yaml", "meta.json"} <= files
    assert m["checkpoint"] == f"s3://{run}/checkpoint_epoch={sel:03d}"


@pytest.mark.slow
def test_killed_worker_restarts_from_its_checkpoint_and_every_epoch_is_recorded_once(s3_run):
    from psamf.storage import read_json

    res, fs, bucket, marker = s3_run
    assert os.path.exists(marker), "the fault was never injected"
    h = res.history
    assert _epochs(h) == [0, 1, 2]
    # epoch 0 by the first worker group; 1-2 by the restarted one, which resumed from epoch 0's checkpoint
    assert [r["session"] for r in h] == [0, 1, 1]
    assert [r["resumed_from"] for r in h] == [None, 0, 0]
    assert res.metrics["sessions"] == 2
    assert _epochs(read_json(fs, f"{bucket}/runs/s3run/history.json")) == [0, 1, 2]


@pytest.mark.slow
def test_two_worker_evaluation_equals_single_process_evaluation(s3_run, shards, s3_server):
    from psamf.evaluate import evaluate_checkpoint

    res, _, _, _ = s3_run
    local, _ = shards
    one = evaluate_checkpoint(res.run_dir, num_workers=0, s3_endpoint=s3_server)
    two = evaluate_checkpoint(res.run_dir, num_workers=2, s3_endpoint=s3_server)
    for split in ("valid", "test"):
        expected = _split_ids(local, split)
        assert one[split].ids == expected and two[split].ids == expected  # none dropped, none twice
        np.testing.assert_allclose(two[split].pred, one[split].pred, atol=1e-5)
        np.testing.assert_array_equal(two[split].label, one[split].label)
        for k in ("mae", "corr", "acc2_has0", "acc7"):
            assert two[split].metrics[k] == pytest.approx(one[split].metrics[k], abs=1e-5)
        # and both equal what training recorded for the selected checkpoint
        assert one[split].metrics["mae"] == pytest.approx(res.metrics[split]["mae"], abs=1e-5)


# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rerunning_an_interrupted_run_name_resumes_from_its_latest_checkpoint(ray_cluster, shards, tmp_path, monkeypatch):
    """keep_checkpoints=1 and a selection order under which the latest checkpoint is not the best one: Ray keeps
    the best and (always) the latest, and the resume continues from the latest. One worker: the resume logic
    does not depend on the world size, and a worker group of one starts faster."""
    local, _ = shards
    storage = tmp_path / "runs"
    base = ["run.keep_checkpoints=1", "optim.select_metric=val_mae", "optim.select_mode=max", "run.max_failures=0",
            "run.num_workers=1"]
    # 1. interrupted: the one worker (rank 0) dies at epoch 2 and no restart is allowed
    import ray.train

    monkeypatch.setenv(T.FAULT_ENV, f"rank=0,epoch=2,marker={tmp_path / 'marker'}")
    with pytest.raises(ray.train.TrainingFailedError):  # the worker group failed: not some other error
        T.train(_cfg(local, str(storage), "resume", *base, "optim.epochs=3"))
    assert (tmp_path / "marker").exists(), "the fault was never injected"
    monkeypatch.delenv(T.FAULT_ENV)
    run_dir = storage / "resume"
    kept = sorted(p.name for p in run_dir.glob("checkpoint_epoch=*"))
    hist = json.loads((run_dir / "history.json").read_text())
    assert _epochs(hist) == [0, 1]
    best = max(range(2), key=lambda e: (hist[e]["val_mae"], e))
    assert "checkpoint_epoch=001" in kept and f"checkpoint_epoch={best:03d}" in kept and len(kept) <= 2
    # 2. re-run the same name: continues at epoch 2 from the latest checkpoint (epoch 1), nothing repeated
    res = T.train(_cfg(local, str(storage), "resume", *base, "optim.epochs=3"))
    assert _epochs(res.history) == [0, 1, 2]
    assert [r["session"] for r in res.history] == [0, 0, 1] and res.history[2]["resumed_from"] == 1
    assert [r["val_mae"] for r in res.history[:2]] == [r["val_mae"] for r in hist]  # old records kept as they were
    # selection spans every epoch, those of the first session included
    assert res.metrics["selection"]["selected_epoch"] == max(range(3), key=lambda e: (res.history[e]["val_mae"], e))


# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("model.vocab_size=64", r"model\.vocab_size=64 is smaller than the text tokenizer's vocabulary"),
    ("optim.select_metric=val_accuracy", r"optim\.select_metric='val_accuracy' is not a validation metric"),
    ("data.tokenizer=bert-base-uncased", r"tokenised with 'psamf:tiny'"),
    ("run.num_workers=6", r"Ray Data read tasks would starve"),  # the session Ray's 6 CPUs, none left for reads
])
def test_bad_config_fails_before_any_worker_starts(ray_cluster, shards, tmp_path, monkeypatch, override, match):
    local, _ = shards

    def no_trainer(*a, **k):
        raise AssertionError("a TorchTrainer was built for a bad config")

    monkeypatch.setattr(T, "build_trainer", no_trainer)
    with pytest.raises(ConfigError, match=match):
        T.train(_cfg(local, str(tmp_path / "runs"), "bad", override))
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.parametrize("kind, scale, workers, knobs", [
    ("sims", 0.15, 0, ()),
    pytest.param("simsv2", 0.08, 2, ("optim.grad_accum=2", "optim.amp=fp16"), marks=pytest.mark.slow)])
def test_sims_and_simsv2_train_with_sims_metrics(ray_cluster, tmp_path, monkeypatch, kind, scale, workers, knobs):
    """CH-SIMS / SIMS v2 end to end: synth (MMSA pickle) -> prepare with the precomputed personality [CLS] ->
    train -> metrics on the SIMS bins (docs/data-formats.md §7.2), every valid/test sample predicted once.
    CH-SIMS trains in local mode (one process); SIMS v2 on 2 DDP workers, with gradient accumulation (DDP's
    no_sync between micro-batches) and float16 autocast with a loss scaler, which the run's outputs record."""
    import pyarrow.parquet as pq

    from psamf.prepare import prepare
    from psamf.synth import synthesize

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    paths = synthesize(kind, "mmsa", tmp_path / "synth", seed=0, scale=scale)
    shards = str(tmp_path / "shards")
    tiny = Config.from_preset("tiny")
    man = prepare({"format": "mmsa", "input": str(paths["pickle"]), "dataset": kind}, shards,
                  tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny", max_text_len=32,
                  personality_model=tiny.model)
    assert man["personality_cls"]["dim"] == tiny.model.hidden_size
    cfg = _cfg(shards, str(tmp_path / "runs"), kind, f"data.dataset={kind}", "optim.epochs=2",
               f"run.num_workers={workers}", *knobs)
    res = T.train(cfg)
    m = res.metrics
    accum, world = (2 if knobs else 1), max(1, workers)
    assert m["batch"] == {"per_worker": cfg.optim.batch_size, "grad_accum": accum, "workers": world,
                          "global": cfg.optim.batch_size * accum * world}
    assert m["amp"] == ("float16" if knobs else "off")
    for rec in res.history:
        assert rec["optimizer_steps"] == -(-rec["train_steps"] // accum) and math.isfinite(rec["train_total"])
    for split in ("valid", "test"):
        assert {"acc2", "acc3", "acc5", "f1", "mae", "corr"} <= set(m[split]), m[split]
        assert "acc2_has0" not in m[split] and "acc7" not in m[split]  # the MOSI/MOSEI contract does not apply
        assert m[split]["n"] == man["counts"][split]
        assert 0.0 <= m[split]["mae"] <= 2.0 and all(0.0 <= m[split][k] <= 1.0 for k in ("acc2", "acc3", "acc5"))
    pred = pq.read_table(res.paths["predictions"]).to_pandas()
    for split in ("valid", "test"):
        part = pred[pred.split == split]
        assert sorted(part.sample_id) == _split_ids(shards, split)
        assert part.label.between(-1.0, 1.0).all()  # SIMS labels
    # the reported test metrics are the SIMS metrics of the saved predictions
    from psamf.metrics import sims_metrics

    t = pred[pred.split == "test"]
    assert m["test"]["acc3"] == pytest.approx(sims_metrics(t.prediction.to_numpy(), t.label.to_numpy())["acc3"])


def test_local_mode_checkpoints_and_resumes_like_ray_train(ray_cluster, shards, tmp_path, monkeypatch):
    """run.num_workers=0 (Ray Train local mode: the loop runs in this process) writes the same checkpoint
    directories, keeps the latest + best k, and a re-run of the name resumes. Re-running a finished run trains
    nothing and re-evaluates the selected checkpoint read back from disk: the same test metrics exactly, and so
    does `psamf evaluate` (every metric of metrics.json, plus its plots)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local, _ = shards
    storage = tmp_path / "runs"
    base = ["run.num_workers=0", "run.keep_checkpoints=1"]
    run = storage / "loc"

    def kept() -> list[str]:
        return sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_"))

    ray_log, seen = logging.getLogger(T.RAY_REPORT_LOGGER), []  # at INFO, as in a job's driver (nothing quiet)
    level, ray_log.level = ray_log.level, logging.INFO
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())  # type: ignore[method-assign]
    ray_log.addHandler(handler)
    try:
        first = T.train(_cfg(local, str(storage), "loc", *base, "optim.epochs=2"))
    finally:
        ray_log.removeHandler(handler)
        ray_log.setLevel(level)
    assert not [m for m in seen if m.startswith("Reported metrics")]  # Ray's INFO line per epoch, in this process
    sel = first.metrics["selection"]["selected_epoch"]
    assert _epochs(first.history) == [0, 1] and first.metrics["sessions"] == 1
    assert first.metrics["controller_poll_s"] is None  # no controller in local mode
    assert kept() == sorted({f"checkpoint_epoch={sel:03d}", "checkpoint_epoch=001"})  # best 1 + latest
    assert first.metrics["checkpoint"] == str(run / f"checkpoint_epoch={sel:03d}")

    second = T.train(_cfg(local, str(storage), "loc", *base, "optim.epochs=3"))
    sel2 = second.metrics["selection"]["selected_epoch"]
    assert _epochs(second.history) == [0, 1, 2] and second.metrics["sessions"] == 2
    assert [r["session"] for r in second.history] == [0, 0, 1] and second.history[2]["resumed_from"] == 1
    assert kept() == sorted({f"checkpoint_epoch={sel2:03d}", "checkpoint_epoch=002"})

    # finished, outputs complete: the run's own result comes back, with no worker started and nothing rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    started = []
    with monkeypatch.context() as mp:
        mp.setattr(T.runtime, "init_ray", lambda *a, **k: started.append(1))
        third = T.train(_cfg(local, str(storage), "loc", *base, "optim.epochs=3"))
    assert not started
    assert third.metrics == second.metrics and third.history == json.loads((run / "history.json").read_text())
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()} == stamps
    # outputs incomplete (metrics.json lost): nothing to train, the selected checkpoint is evaluated again, with
    # the same numbers (the checkpoint read back from disk)
    (run / "metrics.json").unlink()
    fourth = T.train(_cfg(local, str(storage), "loc", *base, "optim.epochs=3"))
    assert _epochs(fourth.history) == [0, 1, 2] and fourth.metrics["selection"]["selected_epoch"] == sel2
    for split in ("valid", "test"):
        assert fourth.metrics[split]["mae"] == pytest.approx(second.metrics[split]["mae"], abs=1e-6)
    # `psamf evaluate RUN --out` reproduces the run's metrics.json, every metric of both splits, and writes the
    # plots next to its metrics; the confusion counts cover every sample of the split once
    from psamf.cli import main

    out = tmp_path / "eval" / "eval.json"
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    again, recorded = json.loads(out.read_text()), json.loads((run / "metrics.json").read_text())
    for split in ("valid", "test"):
        assert set(again[split]) == set(recorded[split])
        for k, v in recorded[split].items():
            assert again[split][k] == pytest.approx(v, abs=1e-5, nan_ok=True), (split, k)
        for name in ("confusion_7class.png", "scatter.png"):
            assert (out.parent / f"{split}_{name}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = (out.parent / f"{split}_confusion_7class.csv").read_text().splitlines()[1:]
        counts = np.array([[int(v) for v in r.split(",")[1:]] for r in rows])
        assert counts.sum() == len(_split_ids(local, split)) == recorded[split]["n"]
        assert np.trace(counts) / counts.sum() == pytest.approx(recorded[split]["acc7"], abs=1e-9)


def test_an_early_stopped_run_resubmitted_returns_its_result_and_continues_with_more_patience(
        ray_cluster, shards, tmp_path, monkeypatch):
    """A run that stopped early has finished: submitted again with the same patience and epochs it returns its
    stored result without starting Ray; with a larger patience it resumes and trains on. Selection on val_acc2_non0
    with a learning rate too small to flip a prediction's sign makes every epoch tie: no strict improvement, so
    patience 1 stops after epoch 1."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local, _ = shards
    storage, run = tmp_path / "runs", tmp_path / "runs" / "es"
    base = ["run.num_workers=0", "optim.epochs=6", "optim.select_metric=val_acc2_non0", "optim.select_mode=max",
            "optim.lr_main=1e-12", "optim.lr_bert=1e-12"]
    first = T.train(_cfg(local, str(storage), "es", *base, "optim.early_stop_patience=1"))
    sel = first.metrics["selection"]
    assert _epochs(first.history) == [0, 1] and sel["early_stopped"] is True and sel["selected_epoch"] == 1

    stamps = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    started = []
    with monkeypatch.context() as mp:
        mp.setattr(T.runtime, "init_ray", lambda *a, **k: started.append(1))
        again = T.train(_cfg(local, str(storage), "es", *base, "optim.early_stop_patience=1"))
    assert not started and again.metrics == first.metrics and again.history == first.history
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()} == stamps

    more = T.train(_cfg(local, str(storage), "es", *base, "optim.early_stop_patience=2"))
    assert _epochs(more.history) == [0, 1, 2] and more.metrics["selection"]["early_stopped"] is True
    assert more.metrics["selection"]["early_stop_patience"] == 2 and more.history[2]["resumed_from"] == 1
