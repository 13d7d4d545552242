"""Ray Tune search (psamf.tune): the search file is validated before any trial; a small grid search, killed once
and resumed, does not rerun its finished trials, records a pruned combination that never trains, and writes every
output. Integration tests use the session Ray (tests/conftest.py), the tiny preset and 1 worker/trial."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from psamf.config import ConfigError
from psamf.tune import SearchSpace, max_concurrent_trials, run_search

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _space(tmp_path: Path, space: dict, **top) -> Path:
    d = {"base": {"preset": "tiny", "overrides": {"optim.epochs": 2}}, "metric": "val_mae", "mode": "min",
         "num_samples": 2, "space": space, **top}
    p = tmp_path / "search.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


# ---------------------------------------------------------------------------------------------- no Ray
@pytest.mark.parametrize("top,space,match", [
    ({"num_sample": 3}, {"optim.lr_main": {"uniform": [1e-4, 1e-3]}}, r"num_sample"),
    ({}, {"optim.lr_mian": {"uniform": [1e-4, 1e-3]}},
     r"space\.optim\.lr_mian: unknown key; allowed in optim: .*lr_main"),
    ({}, {"lr_main": {"uniform": [1e-4, 1e-3]}}, r"space\.lr_main: unknown key; keys are <section>\.<field>"),
    ({}, {"optim.lr_main": {"uniform": [1e-4, 1e-3]}, "model.dropuot": 0.1}, r"space\.model\.dropuot: unknown key"),
    ({}, {"optim.lr_main": {"uniform": [1e-3, 1e-4]}}, r"space\.optim\.lr_main: impossible range uniform"),
    ({}, {"optim.lr_main": {"loguniform": [0, 1e-3]}}, r"space\.optim\.lr_main: impossible range loguniform"),
    ({}, {"model.head_dropout": {"uniform": [0.1, 1.5]}}, r"space\.model\.head_dropout.*1\.5.*head_dropout must be"),
    ({}, {"model.align_layer": {"randint": [0, 7]}}, r"space\.model\.align_layer.*7.*text_layers"),
    ({}, {"model.cross_heads": {"normal": [1, 2]}}, r"space\.model\.cross_heads: expected one of"),
    ({"metric": "test_mae"}, {"optim.lr_main": {"uniform": [1e-4, 1e-3]}}, r"metric='test_mae'.*validation"),
    ({}, {"model.cross_heads": {"grid": [1, 2]}}, r"grid.*search: grid or random"),
    ({}, {"run.num_workers": {"choice": [1, 2]}}, r"space\.run\.num_workers cannot be searched"),
    ({"workers_per_trial": -1}, {"optim.lr_main": {"uniform": [1e-4, 1e-3]}}, r"workers_per_trial must be >= 0"),
])
def test_invalid_search_fails_before_any_trial(tmp_path, top, space, match):
    path = _space(tmp_path, space, **top)
    with pytest.raises(ConfigError, match=match) as e:
        SearchSpace.from_yaml(path)
    assert str(path) in str(e.value)  # the message names the file


def test_combination_dependent_values_are_accepted(tmp_path):
    # align_layer 3 is valid only with text_layers 3: allowed now, pruned at run time when sampled with 2
    s = SearchSpace.from_yaml(_space(tmp_path, {"model.align_layer": {"randint": [0, 3]},
                                                "model.text_layers": {"choice": [2, 3]}, "optim.batch_size": 16}))
    assert [d.key for d in s.dims] == ["model.align_layer", "model.text_layers"]
    assert s.base.optim.batch_size == 16 and s.base.optim.select_metric == "val_mae"


def test_command_line_overrides_join_the_base_and_cannot_fix_a_searched_key(tmp_path, capsys):
    from psamf.cli import main

    path = _space(tmp_path, {"optim.lr_main": {"uniform": [1e-4, 1e-3]}})  # base.overrides: optim.epochs=2
    s = SearchSpace.from_yaml(path, ["optim.epochs=5", "data.uri=s3://b/shards", "optim.batch_size=8"])
    assert (s.base.optim.epochs, s.base.data.uri, s.base.optim.batch_size) == (5, "s3://b/shards", 8)
    assert s.to_saved()["base"]["config"]["data"]["uri"] == "s3://b/shards"  # what --resume reads back
    with pytest.raises(ConfigError, match=r"\['optim\.lr_main'\] are in space"):
        SearchSpace.from_yaml(path, ["optim.lr_main=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.epoch'"):
        SearchSpace.from_yaml(path, ["optim.epoch=5"])
    assert main(["tune", "--resume", "s1", "--storage", str(tmp_path), "optim.epochs=5"]) == 2
    assert "continues the search with the base it started with; drop optim.epochs=5" in capsys.readouterr().err


def test_shipped_search_files_load():
    for name in ("tiny-demo.yaml", "alignment-fusion.yaml"):
        s = SearchSpace.from_yaml(ROOT / "jobs" / "search" / name)
        assert s.metric.startswith("val_") and s.dims
    af = SearchSpace.from_yaml(ROOT / "jobs" / "search" / "alignment-fusion.yaml")
    keys = {d.key for d in af.dims}
    assert {"model.align_layer", "model.text_layers", "model.clip_logit_scale", "model.clip_learn_scale",
            "model.sim_mode", "loss.w_ccl", "loss.w_ps", "loss.w_clm", "model.fusion_dim", "model.serial_dim",
            "model.cross_heads", "optim.lr_bert", "optim.lr_main", "optim.batch_size"} <= keys
    assert af.base.preset == "paper"


def test_max_concurrent_trials_fits_the_cluster(tmp_path):
    s = SearchSpace.from_yaml(_space(tmp_path, {"optim.lr_main": {"uniform": [1e-4, 1e-3]}}, num_samples=64,
                                     workers_per_trial=2))
    assert max_concurrent_trials(s, {"CPU": 2}) == 1  # a 2-core laptop still runs one trial at a time
    assert max_concurrent_trials(s, {"CPU": 64}) == 21  # (64 - 1 for Ray Data) // (2 workers + 1 driver)
    s.base = s.base.replace({"run.use_gpu": True})
    assert max_concurrent_trials(s, {"CPU": 1024, "GPU": 64}) == 32  # GPUs bound it
    assert max_concurrent_trials(s, {"CPU": 1024, "GPU": 64, "TRAIN_DRIVER": 4}) == 4


def test_a_trial_that_trains_in_its_own_process_holds_one_workers_resources_and_no_driver(tmp_path):
    from psamf.tune import _trial_resources, _trial_retries

    s = SearchSpace.from_yaml(_space(tmp_path, {"optim.lr_main": {"uniform": [1e-4, 1e-3]}}, num_samples=64,
                                     workers_per_trial=0))
    assert max_concurrent_trials(s, {"CPU": 4}) == 3  # (4 - 1 for Ray Data) // 1 CPU; no driver CPU
    assert max_concurrent_trials(s, {"CPU": 2}) == 1
    assert _trial_resources(s, {"CPU": 4}) == {"CPU": 1.0}
    assert _trial_resources(s, {"CPU": 4, "TRAIN_DRIVER": 2}) == {"CPU": 1.0}  # trains: not on a driver slot
    assert _trial_retries(s) == s.base.run.max_failures == 2  # Ray Train's restarts become Tune's
    s.base = s.base.replace({"run.use_gpu": True, "run.cpus_per_worker": 4, "run.worker_resources": {"H200": 1}})
    assert _trial_resources(s, {}) == {"CPU": 4.0, "GPU": 1.0, "H200": 1}
    assert max_concurrent_trials(s, {"CPU": 1024, "GPU": 8, "H200": 8, "TRAIN_DRIVER": 2}) == 8  # GPUs bound it
    assert max_concurrent_trials(s, {"CPU": 1024, "GPU": 8, "H200": 3}) == 3
    w1 = SearchSpace.from_yaml(_space(tmp_path, {"optim.lr_main": {"uniform": [1e-4, 1e-3]}}, workers_per_trial=1))
    assert _trial_resources(w1, {"CPU": 4}) == {"CPU": 1}  # the driver's CPU; the worker group holds its own
    assert _trial_resources(w1, {"CPU": 4, "TRAIN_DRIVER": 2}) == {"CPU": 0, "TRAIN_DRIVER": 1}
    assert _trial_retries(w1) == 1


# ---------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def shards(synthetic_shards):
    return synthetic_shards[0]


def _grid_file(tmp_path: Path, shards: str, text_layers: list, epochs: int, scheduler: str,
               align: tuple = (2,)) -> Path:
    return _space(tmp_path, {"model.text_layers": {"grid": text_layers}, "model.align_layer": {"grid": list(align)}},
                  base={"preset": "tiny", "overrides": {"optim.epochs": epochs, "data.uri": shards,
                                                        "run.max_failures": 0}},
                  search="grid", scheduler=scheduler, num_samples=1, workers_per_trial=1, max_concurrent_trials=1)


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_search_resumes_only_unfinished_trials_and_writes_every_output(ray_cluster, shards, tmp_path,
                                                                                 monkeypatch):
    """One search, killed and resumed: a 2 x 2 grid (one combination pruned by the config) of 2-epoch trials with
    ASHA, one trial at a time (`max_concurrent_trials: 1`; the session Ray fits two). Its driver is killed once the
    first trial has finished; the resumed search must not rerun that trial, must record every epoch of every trial
    once, and must write every output. Paths are relative, as `psamf demo` and users write them: trials run in
    other working directories."""
    import ray

    monkeypatch.chdir(tmp_path)
    path = _grid_file(tmp_path, os.path.relpath(shards, tmp_path), [1, 2], epochs=2, scheduler="asha", align=(1, 2))
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    code = ("import sys; from psamf.tune import SearchSpace, run_search; "
            "run_search(SearchSpace.from_yaml(sys.argv[1]), name='s3t', storage_path='runs')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    d = tmp_path / "runs" / "s3t"
    trials = d / "trials"

    def trained_all_epochs(t: Path) -> bool:  # ASHA ends a trial at max_t, before it can write done.json
        h = t / "history.json"
        return h.exists() and len(json.loads(h.read_text())) == 2

    first = None
    deadline = time.monotonic() + 600  # a search that stalls fails the test instead of hanging CI
    try:
        while first is None:
            assert proc.poll() is None, "the search ended before it could be killed"
            assert time.monotonic() < deadline, "no trial ended with every epoch in 600 s"
            started = sorted(t for t in trials.iterdir() if (t / "config.yaml").exists()) if trials.exists() else []
            # the kill lands once a trial has ended with every epoch and the next one has started (one at a time)
            if len(started) >= 2 and trained_all_epochs(started[0]):
                first = started[0].name
            time.sleep(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (d / "metrics.json").exists()  # killed before the end
    before = json.loads((trials / first / "history.json").read_text())
    res = run_search(SearchSpace.from_yaml(path), name="s3t", storage_path="runs", resume=True)
    assert json.loads((trials / first / "history.json").read_text()) == before  # the finished trial was not rerun

    table = pq.read_table(d / "trials.parquet").to_pylist()
    # 2 x 2 grid: (align 2, N 1) is rejected by the config, the other 3 trials train
    assert len(table) == 4 and (d / "trials.csv").read_text().count("\n") == 5
    by_n = {(r["config/model.align_layer"], r["config/model.text_layers"]): r for r in table}
    pruned = by_n[(2, 1)]
    assert pruned["status"] == "pruned" and pruned["epochs_run"] == 0
    assert "align_layer (2)" in pruned["pruned_reason"]
    assert not (trials / pruned["trial_id"] / "history.json").exists()  # never trained
    assert sum(r["status"] == "pruned" for r in table) == 1
    for n in ((1, 1), (1, 2), (2, 2)):
        r = by_n[n]
        assert r["status"] in ("finished", "stopped-early") and r["epochs_run"] >= 1 and r["best_val_mae"] > 0
        hist = json.loads((trials / r["trial_id"] / "history.json").read_text())
        assert [h["epoch"] for h in hist] == list(range(r["epochs_run"])), n  # every epoch once, resumed or fresh
    assert not any(k.startswith(("best_test", "test")) for k in table[0])  # no test numbers in the table
    best = yaml.safe_load((d / "best.yaml").read_text())
    assert best["model"]["text_layers"] == res.best["config/model.text_layers"] and best["run"]["name"] == "s3t-best"
    m = json.loads((d / "metrics.json").read_text())
    assert m["best_trial"] == res.best["trial_id"] and m["test"]["n"] > 0 and "mae" in m["test"]
    assert m["selection"]["metric"] == "val_mae"
    for png in ("metric_over_trials", "importance", "metric_vs_params"):
        assert (d / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(d))
    mux.Reload()
    runs = mux.Runs()
    hparams = mux.PluginRunToTagToContent("hparams")  # what TensorBoard's HParams dashboard reads
    trained = [r["trial_id"] for r in table if r["status"] != "pruned"]
    assert len([k for k in runs if "tensorboard" in k]) == len(trained)  # one run per trial, no Tune duplicates
    for tid in trained:  # curves and an HParams session per trained trial, in the same TensorBoard run
        run = next(k for k in runs if tid in k)
        assert "val/mae" in runs[run]["scalars"] and "hparam/val_mae" in runs[run]["scalars"]
        assert "_hparams_/session_start_info" in hparams.get(run, {})
    assert "s3t" in res.summary and "pruned" in res.summary
    starts = [r["started_utc"] for r in table]  # the table (and the plot's x axis) is in start order
    assert all(starts) and starts == sorted(starts), starts
    assert table[0]["trial_id"] == first  # the trial that ran before the kill started first
    # the resumed session trained the unfinished trials only, and its rate counts those
    resumed_now = int(re.search(r"(\d+) trial\(s\) ended in it", res.summary).group(1))
    assert 1 <= resumed_now < len(table), res.summary

    # resuming the ended search again trains nothing and does not evaluate test a second time
    stamps = {p: p.stat().st_mtime_ns for p in (d / "metrics.json", d / "trials.parquet", d / "best.yaml")}
    again = run_search(SearchSpace.from_yaml(path), name="s3t", storage_path="runs", resume=True)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again.metrics == m and again.best["trial_id"] == res.best["trial_id"] and not again.interrupted
    assert [r["trial_id"] for r in again.rows] == [r["trial_id"] for r in table]
    assert "had already ended" in again.summary and "test was not evaluated again" in again.summary


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_stops_a_search_with_status_130_marks_running_trials_unfinished_and_resume_finishes_it(
        ray_cluster, shards, tmp_path):
    """`psamf tune` gets SIGINT (what Ctrl+C sends its process group) while its first trial trains: it exits with
    status 130 and prints the resume command; the trial that was running is `unfinished` in trials.csv (not
    stopped early), nothing is tested (no metrics.json); `--resume` then finishes every trial and tests once."""
    from tests.helpers import ctrl_c_when, has_complete_checkpoint

    path = _space(tmp_path, {"model.text_layers": {"grid": [1, 2]}},
                  base={"preset": "tiny", "overrides": {"optim.epochs": 12, "data.uri": shards,
                                                        "run.max_failures": 0}},
                  search="grid", scheduler="none", num_samples=1, workers_per_trial=0, max_concurrent_trials=1)
    d = tmp_path / "runs" / "sig"

    def an_epoch_recorded() -> bool:  # the first trial has a complete checkpoint and trains on
        return has_complete_checkpoint(d / "trials", "*/checkpoint_epoch=*") if (d / "trials").exists() else False

    rc, out = ctrl_c_when(["tune", "--config", path, "--name", "sig", "--storage", tmp_path / "runs"],
                          tmp_path / "tune.log", an_epoch_recorded, cwd=tmp_path, timeout=240)
    assert rc == 130, out[-3000:]
    assert f"psamf tune --resume sig --storage {tmp_path / 'runs'}" in out
    assert not (d / "metrics.json").exists() and "test (once)" not in out
    table = pq.read_table(d / "trials.parquet").to_pylist()
    running = [r["trial_id"] for r in table if r["status"] == "unfinished"]
    assert running and not any(r["status"] == "stopped-early" for r in table), table

    res = run_search(SearchSpace.from_yaml(path), name="sig", storage_path=str(tmp_path / "runs"), resume=True)
    table = pq.read_table(d / "trials.parquet").to_pylist()
    assert not res.interrupted and len(table) == 2 and {r["status"] for r in table} == {"finished"}, table
    for r in table:
        hist = json.loads((d / "trials" / r["trial_id"] / "history.json").read_text())
        assert [h["epoch"] for h in hist] == list(range(12))  # every epoch once
        if r["trial_id"] in running:  # it went on from its latest checkpoint, not from scratch
            assert hist[0]["session"] == 0 and hist[-1]["session"] == 1 and hist[-1]["resumed_from"] is not None
    m = json.loads((d / "metrics.json").read_text())
    assert m["best_trial"] == res.best["trial_id"] and m["test"]["n"] > 0


@pytest.mark.integration
def test_placement_groups_of_dead_actors_are_reclaimed_and_nothing_else(ray_cluster):
    """What an ASHA stop leaves behind: the Ray Train controller (an actor) is killed and its worker placement
    group stays reserved (no dashboard, so Ray's own cleaner cannot see the controller die). Only such placement
    groups are removed: one of a live actor and one of the driver stay."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from psamf.runtime import reclaim_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self):
            pg = placement_group([{"CPU": 0.01}])
            ray.get(pg.ready(), timeout=60)
            return pg.id.hex()

    dead, alive = Creator.remote(), Creator.remote()
    dead_pg, alive_pg = ray.get(dead.make.remote()), ray.get(alive.make.remote())
    mine = placement_group([{"CPU": 0.01}])
    try:
        ray.get(mine.ready(), timeout=60)
        ray.kill(dead)
        state = lambda pg_id: placement_group_table()[pg_id]["state"]  # noqa: E731
        assert state(dead_pg) == "CREATED"  # the leak being fixed
        deadline = time.monotonic() + 60
        # the GCS reports the killed creator dead after a moment (longer on a loaded machine); a call may first
        # reclaim an orphan another test left on the shared Ray, so call until this one is gone
        while state(dead_pg) != "REMOVED":
            assert time.monotonic() < deadline, "the dead creator's placement group was never reclaimed"
            time.sleep(0.2)
            reclaim_orphaned_placement_groups()
        assert state(alive_pg) == "CREATED" and state(mine.id.hex()) == "CREATED"
    finally:  # the session's Ray is shared: leave nothing of this test on it
        from ray.util.placement_group import PlacementGroup

        for pg_id in (alive_pg, dead_pg):
            if placement_group_table().get(pg_id, {}).get("state") == "CREATED":
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
        remove_placement_group(mine)
        ray.kill(alive)
        ray.kill(dead)


def test_the_summary_table_lists_the_best_trial_first_and_trials_without_a_value_last():
    from psamf.tune import _summary_table

    rows = [{"trial_id": tid, "status": st, "epochs_run": 2, "best_val_mae": v, "config/optim.lr_main": 0.001}
            for tid, st, v in (("a1", "finished", 0.9), ("b2", "pruned", None), ("c3", "finished", 0.7),
                               ("d4", "stopped-early", 1.2), ("e5", "error", float("nan")))]
    order = [line.split()[0] for line in _summary_table(rows, "val_mae", "min", rows[2]).splitlines()[2:]]
    assert order == ["c3", "a1", "d4", "b2", "e5"]
    assert _summary_table(rows, "val_mae", "min", rows[2]).splitlines()[2].endswith(" *")  # the best marked
    order = [line.split()[0] for line in _summary_table(rows, "val_mae", "max", rows[3]).splitlines()[2:]]
    assert order == ["d4", "a1", "c3", "b2", "e5"]


def test_a_restarted_trials_suffixed_directory_maps_back_to_its_trial_id():
    """`Tuner.restore` may give a restarted trial a suffixed directory (`<id>_6bd6`, seen in CI): the table must
    still find that trial's files under its id."""
    from types import SimpleNamespace

    from psamf.tune import _result_trial_id

    assert _result_trial_id(SimpleNamespace(metrics={}, path="/s/kill/79488_00001_6bd6")) == "79488_00001"
    assert _result_trial_id(SimpleNamespace(metrics=None, path="/s/kill/79488_00001")) == "79488_00001"
    assert _result_trial_id(SimpleNamespace(metrics={}, path="/s/kill/f31d138e_6bd6")) == "f31d138e"
    assert _result_trial_id(SimpleNamespace(metrics={"trial_id": "f31d138e"}, path="/s/x")) == "f31d138e"


def test_a_trial_restored_without_its_config_gets_its_values_from_its_own_files(tmp_path):
    """`Tuner.restore` can hand back a trial that ended before the kill without its config (seen: the pruned
    trial of the killed search above): its searched values come from pruned.json, or from its config.yaml."""
    import pyarrow.fs as pafs

    from psamf.tune import _recorded_params

    fs = pafs.LocalFileSystem()
    keys = ["model.align_layer", "model.text_layers"]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pruned.json").write_text(json.dumps(
        {"trial_id": "p", "params": {"model.align_layer": 2, "model.text_layers": 1, "other": 5}, "reason": "x"}))
    assert _recorded_params(fs, str(tmp_path / "p"), keys) == {"model.align_layer": 2, "model.text_layers": 1}
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.yaml").write_text(yaml.safe_dump({"model": {"align_layer": 1, "text_layers": 3}}))
    assert _recorded_params(fs, str(tmp_path / "t"), keys) == {"model.align_layer": 1, "model.text_layers": 3}
    assert _recorded_params(fs, str(tmp_path / "none"), keys) == {}


def test_a_trial_ended_without_an_epoch_is_unfinished_not_stopped_early(tmp_path):
    """Ctrl+C ends every running trial: one that recorded no epoch yet (no history.json) is `unfinished`, so the
    search says to resume instead of reading a history that is not there; a trial cut by the scheduler after an
    epoch stays `stopped-early`, and one that trained all its epochs `finished`."""
    import pyarrow.fs as pafs

    from psamf.tune import _trial_row

    fs = pafs.LocalFileSystem()
    rec = {"epoch": 0, "session": 0, "val_mae": 1.0}
    for tid, hist in (("cut", [rec]), ("all", [rec, {**rec, "epoch": 1}])):
        (tmp_path / tid).mkdir()
        (tmp_path / tid / "history.json").write_text(json.dumps(hist))

    def status(tid: str) -> str:
        return _trial_row(fs, str(tmp_path), tid, {}, "val_mae", "min", error=False, ended=True, epochs=2)["status"]

    assert (status("none"), status("cut"), status("all")) == ("unfinished", "stopped-early", "finished")


def _small_search(shards: str, workers: int, **top) -> SearchSpace:
    return SearchSpace.from_dict({
        "base": {"preset": "tiny", "overrides": {"data.uri": shards, "optim.epochs": 3}},
        "metric": "val_mae", "mode": "min", "num_samples": 4, "search": "optuna", "scheduler": "asha",
        "grace_period": 1, "reduction_factor": 2, "workers_per_trial": workers, "max_concurrent_trials": 1, "seed": 0,
        "space": {"optim.lr_main": {"loguniform": [1e-3, 1e-2]}, "optim.lr_bert": {"loguniform": [1e-4, 3e-3]},
                  "loss.w_ccl": {"uniform": [0.0, 1.0]}}, **top}, source="test")


@pytest.mark.integration
@pytest.mark.slow
def test_trials_in_their_own_process_find_what_worker_group_trials_find(ray_cluster, shards, tmp_path):
    """The same seeded 4-trial Optuna + ASHA search, one trial at a time, with a Ray Train worker group per trial
    (`workers_per_trial: 1`) and with every trial training in its own process (`0`): the same parameters, the same
    ASHA decisions (statuses, epochs) and the same validation MAE per trial; the in-process trials leave no Ray
    Train run state behind (no controller ran), report every epoch to Tune with its checkpoint, and run in fewer
    processes than trials (Tune reuses the actor)."""
    rows = {}
    for w in (1, 0):
        res = run_search(_small_search(shards, w), name=f"w{w}", storage_path=str(tmp_path / "runs"))
        rows[w] = sorted(res.rows, key=lambda r: r["config/optim.lr_main"])
    assert len(rows[0]) == len(rows[1]) == 4
    assert {r["status"] for r in rows[0]} <= {"finished", "stopped-early"}
    assert sum(r["status"] == "stopped-early" for r in rows[0]) >= 1  # ASHA stopped in-process trials too
    for a, b in zip(rows[0], rows[1]):
        for k in ("config/optim.lr_main", "config/optim.lr_bert", "config/loss.w_ccl", "status", "epochs_run"):
            assert a[k] == b[k], k
        assert a["best_val_mae"] == pytest.approx(b["best_val_mae"], abs=1e-6)
    for r in rows[0]:
        d = tmp_path / "runs" / "w0" / "trials" / r["trial_id"]
        assert not (d / "checkpoint_manager_snapshot.json").exists() and not (d / ".validate_storage_marker").exists()
        hist = json.loads((d / "history.json").read_text())
        assert [h["epoch"] for h in hist] == list(range(r["epochs_run"])) and {h["world_size"] for h in hist} == {1}
        results = [json.loads(line) for line in (tmp_path / "runs" / "w0" / r["trial_id"] / "result.json")
                   .read_text().splitlines()]
        assert [x["epoch"] for x in results] == list(range(r["epochs_run"]))
        for x in results:
            assert x["checkpoint_path"].endswith(f"checkpoint_epoch={x['epoch']:03d}")
    w1 = tmp_path / "runs" / "w1" / "trials" / rows[1][0]["trial_id"]
    assert (w1 / "checkpoint_manager_snapshot.json").exists()  # what the check above would have seen

    def pids(w: int) -> set:  # the process of each trial's function, as Tune records it in every result
        return {json.loads(line)["pid"] for r in rows[w]
                for line in (tmp_path / "runs" / f"w{w}" / r["trial_id"] / "result.json").read_text().splitlines()}

    assert len(pids(1)) == 4  # a new trial actor each time
    assert len(pids(0)) < 4, pids(0)  # trials in their own process reuse the actor (even after an ASHA stop)


@pytest.mark.integration
def test_a_trial_killed_in_its_own_process_is_restarted_by_tune_and_resumes_its_checkpoint(ray_cluster, shards,
                                                                                          s3_server, s3_bucket,
                                                                                          tmp_path, monkeypatch):
    """`workers_per_trial: 0`, the search on S3 (moto): the trial's process exits hard after the first step of
    epoch 1 (the FAULT_ENV hook); Tune restarts the trial (`run.max_failures` restarts), which resumes from the
    checkpoint of epoch 0 in S3 instead of training from scratch, and the search ends with the trial finished and
    every epoch recorded once."""
    from psamf.storage import read_json, resolve

    marker = tmp_path / "marker"
    monkeypatch.setenv("PSAMF_FAULT_INJECT", f"rank=0,epoch=1,marker={marker}")
    storage = f"s3://{s3_bucket}/searches"
    space = _small_search(shards, 0, num_samples=1, search="grid", scheduler="none",
                          space={"model.text_layers": {"grid": [2]}})
    space.base = space.base.replace({"run.s3_endpoint": s3_server})
    res = run_search(space, name="killed", storage_path=storage)
    assert marker.exists() and "exited at epoch 1" in marker.read_text()
    (row,) = res.rows
    assert row["status"] == "finished" and row["epochs_run"] == 3
    st = resolve(storage, s3_server)
    trial = f"{st.run_dir('killed')}/trials/{row['trial_id']}"
    hist = read_json(st.fs, f"{trial}/history.json")
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert [h["session"] for h in hist] == [0, 1, 1] and [h["resumed_from"] for h in hist] == [None, 0, 0]
    done = read_json(st.fs, f"{trial}/done.json")
    assert done["device"] == "cpu" and done["world_size"] == 1 and done["selected_epoch"] in (0, 1, 2)
    assert done["checkpoint_path"].startswith(f"{s3_bucket}/searches/killed/trials/{row['trial_id']}/checkpoint_")
