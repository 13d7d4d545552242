"""Issue 9 fault tests on a real local Ray (one worker, local storage, tiny model):

* item 3: a run of 3 epochs whose latest checkpoint's model.pt is truncated, re-run under the same name with
  more epochs, resumes from the newest intact checkpoint with a warning, trains to the end and records every
  epoch once; Ray's run snapshot no longer names the damaged checkpoint.
* item 7: a finished run directory copied elsewhere, the original deleted, evaluates from the copy.
* a checkpoint a worker uploaded but Ray's controller never registered (a run stopped in between) is resumed from.
* Ctrl+C ends `psamf train` with status 130 and one line; the same command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from psamf import train as T
from psamf.checkpoint import RAY_SNAPSHOT
from psamf.config import Config

pytestmark = pytest.mark.integration

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from psamf.prepare import prepare
    from psamf.synth import synthesize

    root = tmp_path_factory.mktemp("data")
    paths = synthesize("mosi", "mmsa", root / "synth", seed=0, scale=0.1)
    out = str(root / "shards")
    prepare({"format": "mmsa", "input": str(paths["pickle"]), "dataset": "mosi"}, out,
            tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny", max_text_len=50)
    return out


def _cfg(shards: str, storage: str, epochs: int) -> Config:
    # data.max_text_len stays the preset's 32: the shards' 50 is taken from the manifest (item 9)
    return Config.from_preset("tiny").override([
        f"data.uri={shards}", f"run.storage_path={storage}", "run.name=rec", "run.num_workers=1",
        "run.keep_checkpoints=3", "run.max_failures=0", f"optim.epochs={epochs}", "optim.early_stop_patience=50"])


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_and_a_copied_run_evaluates_itself(ray_cluster, shards, tmp_path,
                                                                                  monkeypatch, caplog):
    from psamf.evaluate import evaluate_checkpoint

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "runs"
    run = storage / "rec"
    first = T.train(_cfg(shards, str(storage), 3))
    assert [r["epoch"] for r in first.history] == [0, 1, 2]
    assert first.metrics["source_sha256"] and "git_sha" in first.metrics
    model = run / "checkpoint_epoch=002" / "model.pt"
    with open(model, "r+b") as f:
        f.truncate(os.path.getsize(model) // 2)

    with caplog.at_level(logging.WARNING, logger="psamf.checkpoint"):
        second = T.train(_cfg(shards, str(storage), 4))
    assert "checkpoint epoch 2 is damaged" in caplog.text and "falling back to the checkpoint of epoch 1" in caplog.text
    assert [r["epoch"] for r in second.history] == [0, 1, 2, 3]  # every epoch once
    assert [r["session"] for r in second.history] == [0, 0, 1, 1] and second.history[2]["resumed_from"] == 1
    assert [r["val_mae"] for r in second.history[:2]] == [r["val_mae"] for r in first.history[:2]]
    assert any(p.name.startswith("checkpoint_epoch=002.corrupt") for p in run.iterdir())
    assert (run / "checkpoint_epoch=003" / "model.pt").exists()
    snap = json.loads((run / RAY_SNAPSHOT).read_text())
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_epoch=003"
    assert [r["epoch"] for r in json.loads((run / "history.json").read_text())] == [0, 1, 2, 3]

    # item 7: copy the finished run directory, delete the original, evaluate the copy
    copy = tmp_path / "copied-run"
    shutil.copytree(run, copy)
    shutil.rmtree(run)
    again = evaluate_checkpoint(str(copy), num_workers=0)
    assert again["test"].metrics["mae"] == pytest.approx(second.metrics["test"]["mae"], abs=1e-5)


@pytest.mark.slow
def test_a_checkpoint_that_ray_never_registered_is_resumed_from(ray_cluster, shards, tmp_path, monkeypatch):
    """A run stopped between a worker's upload of an epoch's checkpoint and its registration by Ray's controller
    (Ctrl+C, a killed driver) leaves the directory whole and Ray's run snapshot without it: no snapshot at all when
    that was the first checkpoint. The same command resumes from that checkpoint, as psamf says it does; Ray used to
    restart from the snapshot's older checkpoint, or from scratch, training those epochs again."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "runs"
    run, snap = storage / "rec", storage / "rec" / RAY_SNAPSHOT
    T.train(_cfg(shards, str(storage), 2))
    snap.unlink()  # stopped before Ray registered any checkpoint (and before the outputs)
    (run / "metrics.json").unlink()
    second = T.train(_cfg(shards, str(storage), 3))
    assert [(r["epoch"], r["session"], r["resumed_from"]) for r in second.history[1:]] == [(1, 0, None), (2, 1, 1)]

    # stopped between the upload of epoch 2 and its registration: the snapshot Ray wrote after epoch 1
    s = json.loads(snap.read_text())
    keep = [(r, i) for r, i in zip(s["checkpoint_results"], s["checkpoint_report_indices"])
            if r["checkpoint_dir_name"] != "checkpoint_epoch=002"]
    # (epoch 0's directory stays unregistered: the repair registers the newest intact checkpoint only)
    assert [r["checkpoint_dir_name"] for r, _ in keep] == ["checkpoint_epoch=001"]
    assert s["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_epoch=002"
    s.update(checkpoint_results=[r for r, _ in keep], checkpoint_report_indices=[i for _, i in keep],
             latest_checkpoint_result=keep[-1][0], current_report_index=s["current_report_index"] - 1)
    snap.write_text(json.dumps(s))
    (run / "metrics.json").unlink()
    third = T.train(_cfg(shards, str(storage), 4))
    assert [r["session"] for r in third.history] == [0, 0, 1, 2] and third.history[3]["resumed_from"] == 2
    assert [r["val_mae"] for r in third.history[:3]] == [r["val_mae"] for r in second.history]
    s = json.loads(snap.read_text())
    assert s["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_epoch=003"
    registered = {r["checkpoint_dir_name"] for r in s["checkpoint_results"]}
    assert {"checkpoint_epoch=002", "checkpoint_epoch=003"} <= registered


@pytest.mark.slow
def test_ctrl_c_ends_psamf_train_with_one_line_and_status_130_and_the_same_command_resumes(ray_cluster, shards,
                                                                                           tmp_path):
    """SIGINT to `psamf train` (what Ctrl+C sends its process group) once an epoch is recorded: Ray Train's own
    handler aborts the run and ends fit() with sys.exit, which used to end psamf with status 1 and no word. Now:
    status 130, one line saying the run was interrupted and how to resume; the same command resumes from the latest
    checkpoint and trains every epoch once."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import ray

    from tests.helpers import ctrl_c_when, has_complete_checkpoint

    args = ["train", "--preset", "tiny", f"data.uri={shards}", f"run.storage_path={tmp_path}", "run.name=sigint",
            "run.num_workers=1", "run.max_failures=0", "optim.epochs=200", "optim.early_stop_patience=500"]
    hist = tmp_path / "sigint" / "history.json"
    # once a checkpoint is complete (history.json may run one epoch ahead of the checkpoints, and a checkpoint's
    # meta.json may be uploaded before its other files): a run interrupted before its first complete checkpoint
    # starts afresh, which is not what this test is about
    rc, out = ctrl_c_when(args, tmp_path / "first.log", lambda: has_complete_checkpoint(tmp_path / "sigint"))
    assert rc == 130, out[-3000:]
    assert "psamf train: run sigint was interrupted (Ctrl+C or a stop signal)" in out and "Traceback" not in out
    # the workers stop too: Ray Train's abort (and the driver's exit) ends them within seconds, an epoch or a few
    # here (0.2 s each) after the signal; history.json then stops growing
    seen, still = -1, 0
    while still < 6:
        n = len(json.loads(hist.read_text()))
        seen, still = n, (still + 1 if n == seen else 0)
        time.sleep(0.5)
    done = seen
    assert 1 <= done < 100 and not (tmp_path / "sigint" / "metrics.json").exists()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    again = subprocess.run([sys.executable, "-m", "psamf.cli", *args[:-2], f"optim.epochs={done + 3}",
                            "optim.early_stop_patience=500"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    h = json.loads(hist.read_text())
    assert [r["epoch"] for r in h] == list(range(done + 3)) and h[-1]["session"] == 1
    assert (tmp_path / "sigint" / "metrics.json").exists()
    # the checkpoint the driver says it resumes from is the one the workers restored
    first_new = next(r for r in h if r["session"] == 1)
    assert f"resuming from the checkpoint of epoch {first_new['resumed_from']} " in again.stdout + again.stderr
    assert first_new["resumed_from"] == first_new["epoch"] - 1
