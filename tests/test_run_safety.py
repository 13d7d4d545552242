"""Issue 9, run side, without Ray: checkpoint checksums and repair, clear errors for bad run input (exit status 2,
the file or field named), job-log hygiene, the code version of a run, help text.

Bad-input cases covered here (each asserts the message names the file, field or key):
  1. a truncated model.pt (evaluate): the file named
  2. run.storage_path on a missing S3 bucket: the field and the bucket named, the bucket not created
  3-6. the placeholders of every jobs/configs/*.yaml (YOUR-BUCKET, PATH-OR-HUB): the key and the file named,
       before Ray starts (`psamf train` exits 2)
  7. shards tokenised at 50 tokens with data.max_text_len=32: taken from the manifest (no error)
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import pyarrow.fs as pafs
import pytest
import torch

from psamf import checkpoint, preflight, results
from psamf.config import Config, ConfigError, ablate
from psamf.engine import Selector, build_optimizer, build_scheduler
from psamf.model import build_model
from tests.helpers import fake_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = pafs.LocalFileSystem()


@pytest.fixture(scope="module")
def cfg() -> Config:
    return Config.from_preset("tiny")


def _save(cfg: Config, path: str, epoch: int, history: list, metrics: dict | None = None) -> None:
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    sel = Selector(cfg.optim.select_metric, cfg.optim.select_mode, cfg.optim.early_stop_patience)
    sel.update(epoch, 1.0 / (epoch + 1))
    checkpoint.save_checkpoint(path, model=model, optimizer=opt, scheduler=build_scheduler(opt, cfg.optim),
                               selector=sel, epoch=epoch, history=history, cfg=cfg, metrics=metrics)


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


# ----------------------------------------------------------------------------- item 3: checksums and repair
def test_checkpoint_records_checksums_and_verify_names_the_damaged_file(cfg, tmp_path):
    d = str(tmp_path / "checkpoint_epoch=000")
    _save(cfg, d, 0, [{"epoch": 0}])
    meta = json.loads(open(os.path.join(d, "meta.json")).read())
    assert set(meta["files"]) == {"model.pt", "train_state.pt", "config.yaml"}
    assert all(len(v["sha256"]) == 64 and v["bytes"] > 0 for v in meta["files"].values())
    assert checkpoint.verify_checkpoint(LOCAL, d) == []
    _truncate(os.path.join(d, "model.pt"))
    problems = checkpoint.verify_checkpoint(LOCAL, d)
    assert len(problems) == 1 and "model.pt" in problems[0]
    os.remove(os.path.join(d, "train_state.pt"))
    assert any("train_state.pt" in p and "missing" in p for p in checkpoint.verify_checkpoint(LOCAL, d))


def _snapshot(run: str, epochs: list[int]) -> dict:
    """A Ray 2.60 checkpoint manager snapshot naming `epochs` (same shape as Ray writes)."""
    res = [{"version": 0, "checkpoint_dir_name": f"checkpoint_epoch={e:03d}", "metrics": {"epoch": e}}
           for e in epochs]
    snap = {"ray_version": "2.60.0", "checkpoint_results": res, "checkpoint_report_indices": [e + 1 for e in epochs],
            "latest_checkpoint_result": res[-1], "pending_training_results": [], "pending_validation_specs": [],
            "current_report_index": max(epochs) + 1, "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}
    with open(os.path.join(run, checkpoint.RAY_SNAPSHOT), "w") as f:
        json.dump(snap, f)
    return snap


def test_repair_sets_aside_a_corrupt_latest_checkpoint_and_rewrites_rays_snapshot(cfg, tmp_path, caplog):
    run = str(tmp_path / "run")
    for e in range(3):
        _save(cfg, f"{run}/checkpoint_epoch={e:03d}", e, [{"epoch": i} for i in range(e + 1)])
    _snapshot(run, [0, 1, 2])
    _truncate(f"{run}/checkpoint_epoch=002/model.pt")
    shutil.rmtree(f"{run}/checkpoint_epoch=000")  # a registered checkpoint directory that disappeared
    with caplog.at_level(logging.WARNING, logger="psamf.checkpoint"):
        latest = checkpoint.repair_run(LOCAL, run)
    assert latest == 1
    assert "checkpoint_epoch=002" in caplog.text and "model.pt" in caplog.text and "epoch 1" in caplog.text
    names = sorted(os.listdir(run))
    assert "checkpoint_epoch=002" not in names and any(n.startswith("checkpoint_epoch=002.corrupt") for n in names)
    snap = json.load(open(os.path.join(run, checkpoint.RAY_SNAPSHOT)))
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == ["checkpoint_epoch=001"]
    assert snap["checkpoint_report_indices"] == [2]
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_epoch=001"
    assert checkpoint.repair_run(LOCAL, run) == 1  # idempotent


def test_repair_sets_aside_a_damaged_checkpoint_on_s3(cfg, tmp_path, s3_bucket, caplog):
    """On an object store there is no directory to rename: the damaged checkpoint's objects are copied under the
    .corrupt-K name and deleted, and the run resumes from the intact one (pyarrow's S3 move failed on a prefix)."""
    from psamf.storage import read_json, resolve

    local = str(tmp_path / "run")
    for e in range(2):
        _save(cfg, f"{local}/checkpoint_epoch={e:03d}", e, [{"epoch": i} for i in range(e + 1)])
    _snapshot(local, [0, 1])
    _truncate(f"{local}/checkpoint_epoch=001/model.pt")
    st = resolve(f"s3://{s3_bucket}/runs/run")
    pafs.copy_files(local, st.root, source_filesystem=LOCAL, destination_filesystem=st.fs)
    files = sorted(os.listdir(f"{local}/checkpoint_epoch=001"))
    with caplog.at_level(logging.WARNING, logger="psamf.checkpoint"):
        assert checkpoint.repair_run(st.fs, st.root) == 0
    assert "checkpoint epoch 1 is damaged" in caplog.text and "model.pt" in caplog.text
    listed = {i.base_name: i.type for i in st.fs.get_file_info(pafs.FileSelector(st.root))}
    assert "checkpoint_epoch=001" not in listed and "checkpoint_epoch=000" in listed
    moved = st.fs.get_file_info(pafs.FileSelector(f"{st.root}/checkpoint_epoch=001.corrupt-0"))
    assert sorted(i.base_name for i in moved) == files  # every object kept for a post-mortem
    snap = read_json(st.fs, f"{st.root}/{checkpoint.RAY_SNAPSHOT}")
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == ["checkpoint_epoch=000"]
    assert checkpoint.repair_run(st.fs, st.root) == 0  # idempotent


def test_repair_with_no_intact_checkpoint_starts_afresh(cfg, tmp_path):
    run = str(tmp_path / "run")
    _save(cfg, f"{run}/checkpoint_epoch=000", 0, [{"epoch": 0}])
    _snapshot(run, [0])
    _truncate(f"{run}/checkpoint_epoch=000/train_state.pt")
    assert checkpoint.repair_run(LOCAL, run) is None
    snap = json.load(open(os.path.join(run, checkpoint.RAY_SNAPSHOT)))
    assert snap["checkpoint_results"] == [] and snap["latest_checkpoint_result"] is None


def test_repair_registers_the_newest_intact_checkpoint_that_rays_snapshot_lacks(cfg, tmp_path, caplog):
    """A run stopped between a worker's upload of an epoch's checkpoint and its registration by Ray's controller
    (Ctrl+C, a killed driver) leaves the directory whole and Ray's run snapshot without it: no snapshot at all after
    the first epoch. Ray resumed from the snapshot's older checkpoint, or from scratch, while psamf logged resuming
    from the newer one. repair_run registers it as the latest where Ray's controller would have: Ray's own
    checkpoint manager loads the snapshot, resumes from it and keeps the order its own scores give."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    run = str(tmp_path / "run")
    losses = [0.9, 0.7, float("nan"), 0.8, 0.7]  # val_loss (lower is better): a NaN epoch and a tie
    for e, loss in enumerate(losses):  # each epoch's upload, then the registration that never happened
        _save(cfg, f"{run}/checkpoint_epoch={e:03d}", e, [{"epoch": i} for i in range(e + 1)],
              metrics={"epoch": e, "val_loss": loss, "val_mae": 1.0, "grad_norm": None})
        if e == 0:  # a local-mode run (`LocalCheckpoints`, no Ray Train) gets no snapshot
            assert checkpoint.repair_run(LOCAL, run, ray_train=False) == 0
            assert not os.path.exists(os.path.join(run, checkpoint.RAY_SNAPSHOT))
        with caplog.at_level(logging.INFO, logger="psamf.checkpoint"):
            assert checkpoint.repair_run(LOCAL, run) == e
        assert f"checkpoint_epoch={e:03d} was written but not registered" in caplog.text
        caplog.clear()
    before = open(os.path.join(run, checkpoint.RAY_SNAPSHOT)).read()
    assert checkpoint.repair_run(LOCAL, run) == 4 and "not registered" not in caplog.text  # idempotent
    assert open(os.path.join(run, checkpoint.RAY_SNAPSHOT)).read() == before

    ray_cfg = CheckpointConfig(checkpoint_score_attribute="val_loss", checkpoint_score_order="min")
    mgr = CheckpointManager(checkpoint_config=ray_cfg, storage_context=StorageContext(str(tmp_path), "run"))
    names = [os.path.basename(r.checkpoint.path) for r in mgr._checkpoint_results]
    assert os.path.basename(mgr.latest_checkpoint_result.checkpoint.path) == "checkpoint_epoch=004"
    assert os.path.basename(mgr.best_checkpoint_result.checkpoint.path) == "checkpoint_epoch=004"  # tie: the later
    index = mgr._checkpoint_to_report_index
    ray_order = sorted(mgr._checkpoint_results, key=lambda r: (mgr._get_checkpoint_score(r), index[r.checkpoint]))
    assert names == [os.path.basename(r.checkpoint.path) for r in ray_order]
    assert names == [f"checkpoint_epoch={e:03d}" for e in (2, 0, 3, 1, 4)]  # NaN worst, then by val_loss
    assert [index[r.checkpoint] for r in mgr._checkpoint_results] == [2, 0, 3, 1, 4]
    assert mgr._current_report_index == 5
    assert all("grad_norm" not in r.metrics for r in mgr._checkpoint_results)  # what a report carries


# ----------------------------------------------------------------------------- item 8: evaluate a truncated model.pt
def test_evaluate_of_a_truncated_model_names_the_file(cfg, tmp_path):
    from psamf.commands import evaluate as eval_cmd
    from psamf.cli import command_parser

    d = str(tmp_path / "checkpoint_epoch=004")
    _save(cfg, d, 4, [{"epoch": 4}])
    _truncate(os.path.join(d, "model.pt"))
    with pytest.raises(ConfigError, match=r"checkpoint_epoch=004/model\.pt"):
        checkpoint.load_model_weights(d, build_model(cfg.model))
    args = command_parser("evaluate").parse_args([d])
    assert eval_cmd.run(args) == 2


def test_evaluate_cli_exit_status_2_names_the_file(cfg, tmp_path, capsys):
    from psamf.cli import main

    d = str(tmp_path / "checkpoint_epoch=001")
    _save(cfg, d, 1, [{"epoch": 1}])
    _truncate(os.path.join(d, "model.pt"))
    assert main(["evaluate", d]) == 2
    err = capsys.readouterr().err
    assert "checkpoint_epoch=001/model.pt" in err and "Traceback" not in err


def test_evaluate_names_a_split_the_data_set_lacks_before_ray_starts(cfg, tmp_path, capsys, synthetic_shards):
    """A misspelt `--splits` used to start Ray and end in a traceback; now it is exit status 2 with the splits the
    data set has, and the resolved checkpoint is not evaluated."""
    from psamf.cli import main

    uri, man = synthetic_shards
    d = str(tmp_path / "checkpoint_epoch=002")
    _save(cfg.override([f"data.uri={uri}", "model.audio_dim=5", "model.visual_dim=20"]), d, 2, [{"epoch": 2}])
    assert main(["evaluate", d, "--splits", "valid,tset"]) == 2
    err = capsys.readouterr().err
    assert "--splits 'valid,tset': no split 'tset'" in err and "has test, train, valid" in err, err
    assert "Traceback" not in err


def test_evaluate_refuses_model_overrides_unfitting_shards_and_bad_targets_before_ray_starts(
        cfg, tmp_path, capsys, monkeypatch, synthetic_shards):
    """Shards of another text length or feature width, a model.* override, a plots directory that is a file: each
    used to start Ray and end in a traceback (a state-dict size mismatch, a shape error, FileExistsError after
    metrics.json was written). Now one line, exit status 2, Ray never started, nothing written."""
    from psamf import runtime
    from psamf.cli import main

    started = []
    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: started.append(1))
    uri, man = synthetic_shards
    d = str(tmp_path / "checkpoint_epoch=002")
    fit = cfg.override([f"data.uri={uri}", f"model.audio_dim={man['feature_dims']['audio']}",
                        f"model.visual_dim={man['feature_dims']['visual']}",
                        f"data.max_text_len={man['tokenizers']['text']['max_len']}"])
    _save(fit, d, 2, [{"epoch": 2}])
    assert main(["evaluate", d, "model.hidden_size=64"]) == 2
    assert "only data.*, run.* and optim.amp can change for evaluation" in capsys.readouterr().err
    assert main(["evaluate", d, "optim.amp=off", "data.max_text_len=16"]) == 2  # amp may change, the length not
    assert "data.max_text_len=16 but the shards" in capsys.readouterr().err
    other = str(tmp_path / "ck-other-width")
    _save(fit.override(["model.audio_dim=3"]), other, 2, [{"epoch": 2}])
    assert main(["evaluate", other]) == 2
    assert "audio features of width" in capsys.readouterr().err
    (tmp_path / "plots-file").write_text("")
    assert main(["evaluate", d, "--out", str(tmp_path / "m.json"), "--plots-dir", str(tmp_path / "plots-file")]) == 2
    err = capsys.readouterr().err
    assert "--plots-dir" in err and "is a file, not a directory" in err, err
    assert not started and not (tmp_path / "m.json").exists()


# ----------------------------------------------------------------------------- item 8: missing S3 bucket
def test_storage_path_on_a_missing_bucket_is_refused_and_not_created(cfg, tmp_path, s3_server):
    import boto3

    c = cfg.override(["run.storage_path=s3://psamf-no-such-bucket/runs", f"run.s3_endpoint={s3_server}"])
    with pytest.raises(ConfigError, match=r"run\.storage_path.*psamf-no-such-bucket.*does not exist"):
        preflight.preflight(c, manifest=fake_manifest(), check_resources=False)
    names = [b["Name"] for b in boto3.client("s3", endpoint_url=s3_server).list_buckets()["Buckets"]]
    assert "psamf-no-such-bucket" not in names


# ----------------------------------------------------------------------------- item 9
def test_preflight_takes_the_text_length_from_the_manifest(cfg, tmp_path, caplog):
    c = cfg.override([f"run.storage_path={tmp_path}", "data.max_text_len=32", f"data.uri={tmp_path}/shards"])
    man = fake_manifest()
    man["tokenizers"]["text"]["max_len"] = 50
    with caplog.at_level("INFO", logger="psamf.preflight"):
        for name in ("a", "b", "c"):  # a study preflights each of its runs: the change is said once
            pf = preflight.preflight(c.override([f"run.name={name}"]), manifest=man, check_resources=False)
            assert pf.cfg.data.max_text_len == 50
    assert caplog.text.count("data.max_text_len: 32 -> 50 (from the shards' manifest)") == 1


def test_the_embedded_ray_is_sized_for_the_workers_cpus(cfg, tmp_path, monkeypatch, synthetic_shards):
    """2 workers x 2 CPUs reserve 4: the embedded Ray gets 6 logical CPUs, so the resource check passes on a 2-core
    machine (it used to be sized for the worker count alone and refused the run: 'reserve 4, the cluster has 4')."""
    from psamf import runtime
    from psamf import train as T

    asked = []

    class Started(Exception):
        pass

    def init_ray(cpus=2):
        asked.append(cpus)
        raise Started

    monkeypatch.setattr(runtime, "init_ray", init_ray)
    uri, _ = synthetic_shards
    c = cfg.override([f"run.storage_path={tmp_path}", f"data.uri={uri}", "run.num_workers=2",
                      "run.cpus_per_worker=2", "run.name=sized"])
    with pytest.raises(Started):
        T.train(c)
    assert asked == [4]
    assert runtime.embedded_cpus(4) >= 6 and runtime.embedded_cpus(0.5) >= 4 and runtime.embedded_cpus(7.5) >= 10


def test_a_run_that_never_started_does_not_block_its_name(cfg, tmp_path):
    c = cfg.override([f"run.storage_path={tmp_path}", "run.name=r1"])
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "config.yaml").write_text(c.override(["model.hidden_size=64",
                                                             "model.num_attention_heads=2"]).to_yaml())
    preflight.preflight(c, manifest=fake_manifest(), check_resources=False)  # no checkpoint: not a run to resume
    _save(cfg, str(tmp_path / "r1" / "checkpoint_epoch=000"), 0, [{"epoch": 0}])
    with pytest.raises(ConfigError, match=r"already exists.*model\.hidden_size"):
        preflight.preflight(c, manifest=fake_manifest(), check_resources=False)


def test_a_resumed_run_may_train_longer_but_not_change_its_recipe(cfg, tmp_path):
    """Re-using a finished run's name with a new learning rate used to pass: the restored optimiser state kept the
    old rate while the run's config.yaml was rewritten with the new one. The recipe is refused with the field and
    both values named; how long it trains (and amp, compile) may change."""
    c = cfg.override([f"run.storage_path={tmp_path}", "run.name=r2"])
    (tmp_path / "r2").mkdir()
    resolved = preflight.preflight(c, manifest=fake_manifest(), check_resources=False).cfg  # with the shards' dims
    (tmp_path / "r2" / "config.yaml").write_text(resolved.to_yaml())
    _save(cfg, str(tmp_path / "r2" / "checkpoint_epoch=000"), 0, [{"epoch": 0}])
    longer = c.override([f"optim.epochs={c.optim.epochs + 5}", "optim.early_stop_patience=3", "optim.amp=off",
                         "run.num_workers=1", "data.prefetch_batches=2"])
    preflight.preflight(longer, manifest=fake_manifest(), check_resources=False)
    for change, named in (("optim.lr_main=0.0001", r"optim\.lr_main: 0\.003 -> 0\.0001"),
                          ("optim.batch_size=8", r"optim\.batch_size: 32 -> 8"),
                          ("optim.plateau_factor=0.1", r"optim\.plateau_factor: 0\.5 -> 0\.1")):
        with pytest.raises(ConfigError, match=r"run\.name='r2' already exists.*" + named):
            preflight.preflight(c.override([change]), manifest=fake_manifest(), check_resources=False)


def test_a_run_does_not_resume_on_a_data_set_prepared_again(cfg, tmp_path):
    """`psamf prepare` into the run's data directory again (another corpus, or the same one re-prepared) gives it a
    new data_version; the resumed run used to train on, select on and test on the new data without a word."""
    c = cfg.override([f"run.storage_path={tmp_path}", "run.name=r3"])
    man = fake_manifest(data_version="v-aaaaaaaaaaaa", created_utc="2026-12-01T10:00:00+00:00")
    resolved = preflight.preflight(c, manifest=man, check_resources=False).cfg
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3" / "config.yaml").write_text(resolved.to_yaml())
    (tmp_path / "r3" / preflight.DATA_RECORD).write_text(json.dumps(preflight.data_record(resolved, man)))
    _save(cfg, str(tmp_path / "r3" / "checkpoint_epoch=000"), 0, [{"epoch": 0}])
    preflight.preflight(c, manifest=man, check_resources=False)  # the same data set: resumes
    again = dict(man, data_version="v-bbbbbbbbbbbb", created_utc="2026-12-02T10:00:00+00:00")
    with pytest.raises(ConfigError, match=r"run\.name='r3' started on the data set at .* data_version v-aaaaaaaaaaaa "
                                          r".*now holds data_version v-bbbbbbbbbbbb .*prepared again"):
        preflight.preflight(c, manifest=again, check_resources=False)
    (tmp_path / "r3" / preflight.DATA_RECORD).unlink()  # runs from before the record: resumed as before
    preflight.preflight(c, manifest=again, check_resources=False)


# ----------------------------------------------------------------------------- item 11: placeholders
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "jobs", "configs", "*.yaml"))))
def test_job_config_placeholders_are_named_before_ray_starts(path, monkeypatch, capsys):
    from psamf import runtime
    from psamf.cli import main

    text = open(path).read()
    if "YOUR-BUCKET" not in text and "PATH-OR-HUB" not in text:
        preflight.check_placeholders(Config.from_yaml(path), path)  # no placeholder: passes
        return
    started = []
    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: started.append(1))
    with pytest.raises(ConfigError, match=os.path.basename(path)) as e:
        preflight.check_placeholders(Config.from_yaml(path), path)
    assert "data.uri" in str(e.value) and "run.storage_path" in str(e.value)
    if "PATH-OR-HUB" in text:
        assert "model.personality_model" in str(e.value)
    assert main(["train", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "YOUR-BUCKET" in err and "data.uri" in err and "Traceback" not in err
    assert not started


def test_train_without_a_data_set_fails_before_ray_starts(tmp_path, monkeypatch, capsys):
    """`psamf train` on a path with no prepared data set used to start an embedded Ray first (13-23 s here)."""
    from psamf import runtime
    from psamf.cli import main

    started = []
    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: started.append(1))
    assert main(["train", "--preset", "tiny", f"data.uri={tmp_path / 'none'}", f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'none'}: no such directory" in err and "Traceback" not in err, err
    assert not started


def test_an_unreachable_object_store_is_one_line_and_status_2_not_a_traceback(tmp_path, monkeypatch, capsys,
                                                                             refusing_port):
    """No S3 endpoint listening (a closed port on 127.0.0.1): botocore's EndpointConnectionError, which s3fs passes
    through untranslated, used to end `psamf train` and `psamf evaluate` with a traceback."""
    from psamf.cli import main

    port = refusing_port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "psamf-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "psamf-test-secret")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would only make the test slower
    endpoint = f"http://127.0.0.1:{port}"
    assert main(["train", "--preset", "tiny", "data.uri=s3://no-such-bucket/shards", f"data.s3_endpoint={endpoint}",
                 f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "psamf train: error: the object store could not be used" in err and endpoint in err, err
    assert "Traceback" not in err and "psamf-test-secret" not in err and "psamf-test-key" not in err
    assert not list(tmp_path.iterdir())  # nothing written
    # prepare's bucket check (s3fs said "does not exist" for an unreachable endpoint) and pyarrow's S3 (tune)
    assert main(["prepare", "--format", "mmsa", "--input", str(tmp_path / "x.pkl"), "--dataset", "mosi",
                 "--out", "s3://no-such-bucket/shards", "--s3-endpoint", endpoint, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "psamf prepare: error: the object store could not be used" in err and "does not exist" not in err, err
    assert main(["tune", "--resume", "s1", "--storage", "s3://no-such-bucket/runs", "--s3-endpoint", endpoint]) == 2
    err = capsys.readouterr().err
    assert "psamf tune: error: the object store could not be used" in err and "NETWORK_CONNECTION" in err, err


def test_seed_grids_and_searches_check_their_data_and_runs_before_ray_starts(cfg, tmp_path, monkeypatch, capsys,
                                                                            synthetic_shards):
    """`psamf train --seeds` and `psamf study` used to start an embedded Ray before their preflight (a changed
    recipe under a used name was refused about 4 s later); `psamf tune` without a data set likewise."""
    import yaml

    from psamf import runtime
    from psamf.cli import main

    started = []
    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: started.append(1))
    assert main(["train", "--preset", "tiny", "--seeds", "1,2", f"data.uri={tmp_path / 'none'}",
                 f"run.storage_path={tmp_path}"]) == 2
    assert f"{tmp_path / 'none'}: no such directory" in capsys.readouterr().err
    uri, _ = synthetic_shards
    c = cfg.override([f"data.uri={uri}", f"run.storage_path={tmp_path}", "run.name=g-seed1"])
    resolved = preflight.preflight(c, check_resources=False).cfg
    (tmp_path / "g-seed1").mkdir()
    (tmp_path / "g-seed1" / "config.yaml").write_text(resolved.replace({"optim.seed": 1}).to_yaml())
    _save(cfg, str(tmp_path / "g-seed1" / "checkpoint_epoch=000"), 0, [{"epoch": 0}])
    assert main(["train", "--preset", "tiny", "--seeds", "1,2", "--run-name", "g", f"data.uri={uri}",
                 f"run.storage_path={tmp_path}", "optim.lr_main=0.0001"]) == 2
    assert "optim.lr_main: 0.003 -> 0.0001" in capsys.readouterr().err
    search = tmp_path / "s.yaml"
    search.write_text(yaml.safe_dump({"base": {"preset": "tiny", "overrides": {"data.uri": str(tmp_path / "none")}},
                                      "metric": "val_mae", "mode": "min", "num_samples": 2,
                                      "space": {"optim.lr_main": {"uniform": [1e-4, 1e-3]}}}))
    assert main(["tune", "--config", str(search), "--name", "s", "--storage", str(tmp_path / "runs")]) == 2
    assert f"{tmp_path / 'none'}: no such directory" in capsys.readouterr().err
    assert not started


def test_a_refused_resume_fails_before_ray_starts(cfg, tmp_path, monkeypatch, capsys, synthetic_shards):
    from psamf import runtime
    from psamf.cli import main

    uri, man = synthetic_shards
    args = ["train", "--preset", "tiny", "--run-name", "r3", f"data.uri={uri}", f"run.storage_path={tmp_path}"]
    resolved = preflight.preflight(cfg.override(args[5:] + ["run.name=r3"]), manifest=man, check_resources=False)
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3" / "config.yaml").write_text(resolved.cfg.to_yaml())
    _save(resolved.cfg, str(tmp_path / "r3" / "checkpoint_epoch=000"), 0, [{"epoch": 0}])
    started = []
    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: started.append(1))
    assert main(args + ["optim.lr_main=0.0001"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr_main: 0.003 -> 0.0001" in err and "Traceback" not in err, err
    assert not started
    assert "lr_main: 0.003" in (tmp_path / "r3" / "config.yaml").read_text()  # the run's config is left as it was


def test_placeholders_overridden_on_the_command_line_pass(tmp_path):
    path = os.path.join(REPO, "jobs", "configs", "mosi-reference.yaml")
    c = Config.from_yaml(path).override([f"data.uri={tmp_path}", f"run.storage_path={tmp_path}",
                                         "model.personality_model=null"])
    preflight.check_placeholders(c)


# ----------------------------------------------------------------------------- item 12: --ablation a --ablation b
def test_two_ablations_compose():
    from psamf.cli import command_parser
    from psamf.commands.common import load_config
    from psamf.config import ABLATIONS

    a, b = sorted(ABLATIONS)[:2]
    args = command_parser("train").parse_args(["--ablation", a, "--ablation", b])
    got = load_config(args)
    base = Config.from_preset("tiny")
    assert got.to_dict() == ablate(ablate(base, a), b).to_dict()
    assert got.to_dict() != ablate(base, b).to_dict() and got.to_dict() != ablate(base, a).to_dict()


# ----------------------------------------------------------------------------- item 14: job logs, code version
def test_worker_logging_keeps_psamf_lines_and_drops_rays_per_rank_info(capfd):
    from psamf.train import configure_worker_logging

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        configure_worker_logging()
        # Ray 2.60 logs "Reporting training result" at INFO through logging.getLogger(__file__)
        logging.getLogger("/site-packages/ray/train/v2/_internal/execution/context.py").info(
            "Reporting training result 1: ... from rank 0")
        logging.getLogger("psamf.train").info("epoch 0 (1.0 s): val_mae=0.9")
        err = capfd.readouterr().err
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    assert "epoch 0 (1.0 s)" in err and "Reporting training result" not in err and "\x1b[" not in err


def test_code_version_without_git_is_the_version_and_a_source_hash(monkeypatch):
    from psamf import __version__

    monkeypatch.delenv("PSAMF_GIT_SHA", raising=False)
    monkeypatch.setattr(results, "git_sha", lambda: None)
    v = results.code_version()
    assert v["git_sha"] is None and v["psamf_version"] == __version__ and len(v["source_sha256"]) == 64
    assert v == results.code_version()  # deterministic
    monkeypatch.setenv("PSAMF_GIT_SHA", "abc123")
    assert results.code_version()["git_sha"] == "abc123"


def test_train_console_does_not_dump_the_resolved_config(tmp_path, monkeypatch, caplog):
    from psamf.commands import train as train_cmd
    from psamf.cli import command_parser

    def stop(cfg, seeds=None):
        raise ConfigError("stop here")

    monkeypatch.setattr(train_cmd, "train", stop)
    with caplog.at_level(logging.INFO):
        assert train_cmd.run(command_parser("train").parse_args([f"run.storage_path={tmp_path}"])) == 2
    assert "model:" not in caplog.text and "hidden_size" not in caplog.text
    assert "config.yaml" in caplog.text


# ----------------------------------------------------------------------------- item 15: help text
def test_every_option_of_every_command_has_help_text():
    from psamf.cli import COMMANDS, command_parser

    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name in COMMANDS
               for a in command_parser(name)._actions if not a.help]
    assert not missing, missing
