"""Studies: the statistics without Ray (paired test, spread flag, table, chance levels, ridge baseline), the CLI,
and one real Tune grid (full model vs a crippled row, 2 seeds, 1 worker) that must flag the crippled row."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np
import pytest

from psamf import study as S
from psamf.config import Config, ConfigError, ablate

os.environ.setdefault("OMP_NUM_THREADS", "1")

METRICS = {"mae": 0.70, "corr": 0.60, "acc7": 0.35, "acc2_has0": 0.78, "acc2_non0": 0.80, "f1_has0": 0.77,
           "f1_non0": 0.79, "acc5": 0.40, "n": 100, "n_non0": 98}
BASELINES = {"mae_mean": 1.20, "mae_median": 1.18, "mae_zero": 1.30, "acc2_has0": 0.55, "acc2_non0": 0.56,
             "acc7": 0.20, "acc5": 0.25, "n": 100, "n_non0": 98}


def _grid_result(row: str, seed: int, shift: Mapping | None = None, history=None) -> S.GridResult:
    test = dict(METRICS)
    noise = {1: 0.01, 2: -0.012, 3: 0.004}[seed]  # seed-to-seed spread, identical in every row
    for k in ("mae", "corr", "acc7", "acc2_has0", "acc2_non0", "f1_has0", "f1_non0"):
        test[k] += noise + (shift or {}).get(k, 0.0)
    return S.GridResult(row=row, seed=seed, status="ok", run_name=f"st-{row}-seed{seed}", run_dir=f"/r/{row}{seed}",
                        metrics={"test": test, "valid": test, "baselines": {"test": BASELINES}},
                        history=history or [])


def _cfgs(*rows: str) -> dict[str, Config]:
    return {r: Config.from_preset("tiny") for r in rows}


def test_identical_configurations_flag_nothing():
    grid = [_grid_result(r, s) for r in ("full", "same") for s in (1, 2, 3)]
    summary = S.summarize_study(grid, reference="full", cfgs=_cfgs("full", "same"))
    cmp = summary["rows"]["same"]["vs_reference"]
    assert all(c["flag"] is None and c["diff"] == 0 and c["p"] == 1.0 for c in cmp.values()), cmp
    assert summary["rows"]["same"]["flags"] == {"worse": [], "better": []}
    assert summary["rows"]["full"]["test"]["mae"]["std"] == pytest.approx(np.std([0.71, 0.688, 0.704]))


def test_a_clearly_worse_row_is_flagged_and_a_noisy_one_is_not():
    worse = {"mae": 0.30, "corr": -0.20, "acc2_has0": -0.10}
    grid = [_grid_result("full", s) for s in (1, 2, 3)] + [_grid_result("bad", s, worse) for s in (1, 2, 3)]
    # "noisy": differences of mixed sign per seed, mean well inside the seed spread
    grid += [_grid_result("noisy", s, {"mae": {1: 0.015, 2: -0.01, 3: 0.0}[s]}) for s in (1, 2, 3)]
    summary = S.summarize_study(grid, reference="full", cfgs=_cfgs("full", "bad", "noisy"))
    bad = summary["rows"]["bad"]
    assert set(bad["flags"]["worse"]) == {"mae", "corr", "acc2_has0"} and bad["flags"]["better"] == []
    assert bad["vs_reference"]["mae"]["diff"] == pytest.approx(0.30)
    assert summary["rows"]["noisy"]["flags"] == {"worse": [], "better": []}
    # better in every seed beyond the spread (lower MAE) is flagged "better", not "worse"
    c = S.paired_test([0.7, 0.71, 0.69], [0.5, 0.52, 0.49], "mae")
    assert c.flag == "better" and c.diff < 0


def test_paired_test_matches_scipy_and_handles_few_seeds():
    from scipy import stats

    a, b = [0.70, 0.72, 0.69, 0.71], [0.74, 0.73, 0.75, 0.72]
    c = S.paired_test(a, b, "mae")
    r = stats.ttest_rel(b, a)
    assert c.t == pytest.approx(r.statistic) and c.p == pytest.approx(r.pvalue) and c.n == 4
    one = S.paired_test([0.7], [0.9], "mae")
    assert math.isnan(one.p) and one.flag is None  # one seed: no test, no flag
    with pytest.raises(ValueError, match="same seeds"):
        S.paired_test([0.7, 0.8], [0.9], "mae")
    assert "4.30" in S.power_note(3) and "12.71" in S.power_note(2)
    import warnings

    with warnings.catch_warnings():  # the same difference on every seed, up to round-off: no scipy warning
        warnings.simplefilter("error")
        same = S.paired_test([0.7, 0.8, 0.9], [0.8, 0.9, 1.0], "mae")
        none = S.paired_test([0.7, 0.8, 0.9], [0.7, 0.8, 0.9], "mae")
    assert same.t == math.inf and same.p == 0.0 and same.diff == pytest.approx(0.1) and same.flag == "worse"
    assert none.t == 0.0 and none.p == 1.0 and none.flag is None


def test_only_common_seeds_are_paired():
    grid = [_grid_result("full", s) for s in (1, 2, 3)] + [_grid_result("x", s, {"mae": 0.3}) for s in (1, 3)]
    summary = S.summarize_study(grid, reference="full", cfgs=_cfgs("full", "x"))
    assert summary["rows"]["x"]["vs_reference"]["mae"]["n"] == 2
    assert summary["rows"]["x"]["seeds_ok"] == [1, 3]


def test_study_table_has_the_papers_shape():
    worse = {"mae": 0.30}
    grid = [_grid_result("full", s) for s in (1, 2)] + [_grid_result("bad", s, worse) for s in (1, 2)]
    grid.append(S.GridResult("bad", 3, "error", "st-bad-seed3", "/r/bad3", error="boom"))
    ridge = {"alpha": 10.0, "test": {k: v for k, v in METRICS.items()}, "train_constant_mae": 1.1}
    summary = S.summarize_study(grid, reference="full", cfgs=_cfgs("full", "bad"), ridge=ridge,
                                train_constant_mae=1.1)
    text = S.format_study_table(summary, title="t")
    lines = text.splitlines()
    assert lines[0] == "## t"
    header = next(line for line in lines if line.startswith("| Model | MAE"))
    assert header == ("| Model | MAE | Corr | Acc-7 | Acc-2 (Has0/Non0) | F1 (Has0/Non0) | seeds | "
                      "loss terms at chance |")
    full = next(line for line in lines if line.startswith("| full (reference)"))
    assert "0.699 ± 0.011" in full and "77.90 ± 1.10 / 79.90 ± 1.10" in full  # acc in %, mean ± population std
    assert any(line.startswith("| bad |") and "2 (1 failed)" in line for line in lines)
    assert any(line.startswith("| trivial") and "1.200 (mean)" in line and "55.00 / 56.00" in line for line in lines)
    assert any(line.startswith("| ridge (bag-of-words") and "alpha=10" in line for line in lines)
    diff = next(line for line in lines if line.startswith("| bad |") and "Δ" not in line and "**" in line)
    assert "**+0.300" in diff and "worse: mae" in diff
    assert "Power: 2 seeds" in text
    json.dumps(summary, allow_nan=True)  # JSON-ready (written by write_json)


def test_a_row_with_one_finished_seed_shows_no_spread():
    grid = [_grid_result("full", s) for s in (1, 2)] + [_grid_result("one", 1)]
    text = S.format_study_table(S.summarize_study(grid, reference="full", cfgs=_cfgs("full", "one")))
    one = next(line for line in text.splitlines() if line.startswith("| one |") and "(n=1)" in line)
    assert "0.710 (n=1)" in one and "±" not in one.split("|")[2]


def test_a_study_with_a_failed_run_writes_the_table_of_the_others_and_fails(shards, tmp_path, monkeypatch, capsys):
    """The grid itself is Ray's part (tested below); here its outcome has one failed run: study.md and study.json
    are written (the failed seed named), the table printed, and the command fails with status 1 naming the run."""
    from psamf.cli import main

    uri, _ = shards
    grid = [_grid_result("full", s) for s in (1, 2)] + [_grid_result("no_ps", 1),
                                                        S.GridResult("no_ps", 2, "error", "f-no_ps-seed2", "/r/x",
                                                                     error="RuntimeError: boom")]
    monkeypatch.setattr(S, "run_grid", lambda *a, **k: grid)
    assert main(["study", "ablations", "--preset", "tiny", "--rows", "full,no_ps", "--seeds", "1,2", "--name", "f",
                 f"data.uri={uri}", f"run.storage_path={tmp_path}"]) == 1
    out, err = capsys.readouterr()
    assert "| no_ps | " in out and "1 (1 failed)" in out
    assert "1 of 4 run(s) failed" in err and "f-no_ps-seed2: RuntimeError: boom" in err and "--resume" in err
    assert json.loads((tmp_path / "f" / "study.json").read_text())["rows"]["no_ps"]["failed"] == {
        "2": "RuntimeError: boom"}


def test_study_ablations_refuses_an_ablation_of_its_reference_row(capsys):
    from psamf.cli import main

    assert main(["study", "ablations", "--preset", "tiny", "--ablation", "no_ps"]) == 2
    assert "would turn the reference row 'full' into an ablation" in capsys.readouterr().err


def test_chance_levels_follow_the_loss_definitions():
    cfg = Config.from_preset("tiny")  # batch 32, per_sample / batch dissimilarity weighting
    B = cfg.optim.batch_size
    lv = S.chance_levels(cfg, train_constant_mae=1.0)
    assert lv["clm"] == pytest.approx(2 * math.log(B))  # two symmetric CLIP terms, ln B each
    assert lv["ccl"] == pytest.approx(0.5 * math.log(B)) and lv["l1"] == 1.0 and lv["ps"] == pytest.approx(0.5)
    assert "clm" not in S.chance_levels(ablate(cfg, "no_clm")) and "l1" not in S.chance_levels(cfg)
    nop = S.chance_levels(ablate(cfg, "no_personality"), 1.0)
    assert "ccl" not in nop and nop["ps"] == 1.0
    cos = S.chance_levels(cfg.replace({"model.sim_mode": "per_sample_cosine"}))
    assert cos["ccl"] == 0.0


def test_a_train_run_records_and_reports_its_terms_at_chance():
    """metrics.json's `terms_at_chance` (results.chance_record) and the line `psamf train` prints under the table
    (results.chance_line): only terms that stayed at chance in every epoch are named, with their last value."""
    from psamf.results import chance_line, chance_record

    cfg = Config.from_preset("tiny")
    lnb = math.log(cfg.optim.batch_size)
    hist = [{"train_clm": 2 * lnb - d, "train_ccl": v} for d, v in ((0.0, 1.4), (0.1, 0.9), (0.05, 0.3))]
    rec = chance_record(cfg, hist)
    assert rec["terms"]["clm"] == {"level": pytest.approx(2 * lnb), "last": 2 * lnb - 0.05, "at_chance": True}
    assert rec["terms"]["ccl"] == {"level": pytest.approx(0.5 * lnb), "last": 0.3, "at_chance": False}
    line = chance_line({"terms_at_chance": rec})
    assert line is not None and "ccl" not in line
    assert f"train clm {2 * lnb - 0.05:.4f} (chance level {2 * lnb:.4f})" in line
    hist[1]["train_clm"] = 0.8 * 2 * lnb  # left its chance level once: not flagged
    assert chance_line({"terms_at_chance": chance_record(cfg, hist)}) is None
    assert chance_line({}) is None  # a run written before the record
    assert "clm" not in chance_record(ablate(cfg, "no_clm"), hist)["terms"]


def test_terms_stuck_at_chance_are_detected():
    B = 32
    lv = {"clm": 2 * math.log(B), "ccl": 0.0}
    stuck = [{"train_clm": 2 * math.log(B) + d, "train_ccl": 0.01 * (-1) ** i} for i, d in enumerate((0.02, -0.01, 0.0))]
    learns = [{"train_clm": v, "train_ccl": 1.0} for v in (6.9, 5.0, 3.1)]
    assert S.terms_at_chance(stuck, lv, B) == {"clm": True, "ccl": True}
    assert S.terms_at_chance(learns, lv, B) == {"clm": False, "ccl": False}
    cfgs = _cfgs("full", "stuck")
    grid = [_grid_result("full", s, history=learns) for s in (1, 2)]
    grid += [_grid_result("stuck", s, history=stuck) for s in (1, 2)]
    summary = S.summarize_study(grid, reference="full", cfgs=cfgs)
    assert summary["rows"]["stuck"]["chance"]["clm"] == {"level": pytest.approx(lv["clm"]), "seeds_at_chance": 2,
                                                         "n": 2}
    assert summary["rows"]["full"]["chance"]["clm"]["seeds_at_chance"] == 0
    text = S.format_study_table(summary)
    assert any(line.startswith("| stuck |") and "clm 2/2" in line for line in text.splitlines())


@pytest.fixture(scope="module")
def shards(synthetic_shards):
    return synthetic_shards


def test_ridge_baseline_beats_the_mean_predictor(shards):
    from psamf.metrics import trivial_baselines
    from psamf.storage import resolve as storage_target

    uri, man = shards
    r = S.ridge_baseline(uri, "mosi")
    test_labels = S._split_table(man, storage_target(uri), "test").column("label").to_numpy()
    floor = trivial_baselines(test_labels, "mosi")["mae_mean"]
    assert r["test"]["mae"] < floor, (r["test"]["mae"], floor)
    assert r["n"] == {s: man["counts"][s] for s in ("train", "valid", "test")} and r["alpha"] in S.RIDGE_ALPHAS
    assert r["train_constant_mae"] > 0


def test_cli_parses_a_study():
    from psamf.cli import build_parser, parse_args

    args = parse_args(build_parser("study"), ["study", "layers", "--preset", "tiny", "--seeds", "1,2", "--name", "x",
                                              "optim.epochs=2"])
    assert args.kind == "layers" and args.seeds == "1,2" and args.overrides == ["optim.epochs=2"]
    from psamf.commands.common import load_config, parse_seeds

    assert load_config(args).optim.epochs == 2 and parse_seeds(args.seeds) == [1, 2]
    with pytest.raises(ConfigError, match=r"--seeds 1,2,1: seed\(s\) 1 given twice"):
        parse_seeds("1,2,1")


def test_an_option_and_an_override_of_the_same_key_must_agree():
    from psamf.cli import build_parser, parse_args
    from psamf.commands.train import config_from_args

    args = parse_args(build_parser("train"), ["train", "--preset", "tiny", "--run-name", "a", "run.name=b"])
    with pytest.raises(ConfigError, match="run.name is given twice, 'a' by the option and 'b' as an override"):
        config_from_args(args)
    same = parse_args(build_parser("train"), ["train", "--preset", "tiny", "--run-name", "a", "run.name=a"])
    assert config_from_args(same).run.name == "a"


def test_a_study_can_run_a_subset_of_its_rows_that_holds_the_reference():
    from psamf.cli import build_parser, parse_args

    args = parse_args(build_parser("study"), ["study", "ablations", "--rows", "full, no_personality"])
    assert args.rows == "full, no_personality"
    cfg = Config.from_preset("tiny")
    rows = [("full", cfg)] + [(a, cfg) for a in ("no_clm", "no_personality")]
    assert [r for r, _ in S.select_rows(rows, ["no_personality", "full"], "full", "ablations")] == \
        ["full", "no_personality"]  # the study's order, not the caller's
    assert S.select_rows(rows, None, "full", "ablations") == rows
    with pytest.raises(ConfigError, match=r"unknown row\(s\) \['no_pers'\]; the rows are \['full', 'no_clm'"):
        S.select_rows(rows, ["full", "no_pers"], "full", "ablations")
    with pytest.raises(ConfigError, match="must include the reference row 'full'"):
        S.select_rows(rows, ["no_clm"], "full", "ablations")
    # the study functions check before Ray starts: a bad subset costs no trial
    with pytest.raises(ConfigError, match="reference row 'align1'"):
        S.study_layers(cfg.override(["model.align_layer=1"]), [1], only=["align0"], storage_path="/nonexistent")


def test_a_grid_trial_of_a_run_without_workers_holds_one_workers_resources():
    """A row with run.num_workers=0 trains in the trial's own process: the trial holds one worker's resources and
    needs no driver CPU; a row with a worker group keeps the driver's CPU (its workers hold their own)."""
    cfg = Config.from_preset("tiny").override(["run.num_workers=1"])
    own = cfg.override(["run.num_workers=0", "run.cpus_per_worker=2", "run.use_gpu=true"])
    res = S._TrialResources({"full": cfg.run, "own": own.run})
    assert res({"row": "full", "seed": 1}).bundles == [{"CPU": S.DRIVER_CPU}]
    assert res({"row": "own", "seed": 1}).bundles == [{"CPU": 2.0, "GPU": 1.0}]
    solo = cfg.override(["run.num_workers=0"])
    assert S.max_concurrent_trials([solo], 8, {"CPU": 4}) == 3  # (4 - 1 for Ray Data) // 1: no driver CPU
    assert S.max_concurrent_trials([solo, cfg], 8, {"CPU": 4}) == 1  # a mixed grid sizes for the larger trial


def test_max_concurrent_trials_leaves_a_cpu_for_ray_data():
    cfg = Config.from_preset("tiny").override(["run.num_workers=1"])
    assert S.max_concurrent_trials([cfg], 4, {"CPU": 4}) == 1  # (4 - 1) // (1 + 1)
    assert S.max_concurrent_trials([cfg], 4, {"CPU": 2}) == 1  # never 0
    assert S.max_concurrent_trials([cfg], 20, {"CPU": 64}) == 20
    gpu = cfg.override(["run.use_gpu=true"])
    assert S.max_concurrent_trials([gpu], 20, {"CPU": 64, "GPU": 2}) == 2


# --------------------------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_a_real_grid_flags_a_crippled_row_and_writes_every_output(ray_cluster, shards, tmp_path, capsys):
    from psamf.storage import resolve as storage_target

    uri, _ = shards
    base = Config.from_preset("tiny").override([f"data.uri={uri}", "run.num_workers=1", "optim.epochs=1",
                                                 "optim.batch_size=16", "run.max_failures=0"])
    crippled = base.override(["optim.lr_main=1e-12", "optim.lr_bert=1e-12"])
    res = S.run_study([("full", base), ("frozen", crippled)], "full", [1, 2], name="st", title="grid",
                      storage_path=str(tmp_path))
    assert [(g.row, g.seed, g.status) for g in res.grid] == [("full", 1, "ok"), ("full", 2, "ok"),
                                                             ("frozen", 1, "ok"), ("frozen", 2, "ok")]
    for g in res.grid:
        assert g.run_name == f"st-{g.row}-seed{g.seed}" and g.metrics["seed"] == g.seed
        assert os.path.exists(os.path.join(tmp_path, g.run_name, "metrics.json")) and len(g.history) == 1
    frozen = res.summary["rows"]["frozen"]
    assert "mae" in frozen["flags"]["worse"], frozen["vs_reference"]["mae"]
    assert (tmp_path / "st" / "study.md").read_text() == res.table
    assert json.loads((tmp_path / "st" / "study.json").read_text())["rows"]["frozen"]["flags"] == frozen["flags"]
    assert "| frozen |" in capsys.readouterr().out
    # a restored grid keeps its finished trials: nothing is rerun, the same runs come back
    mtimes = {g.run_name: os.path.getmtime(os.path.join(tmp_path, g.run_name, "metrics.json")) for g in res.grid}
    again = S.run_grid([("full", base), ("frozen", crippled)], [1, 2], name="st", storage_path=str(tmp_path),
                       resume=True)
    assert [g.status for g in again] == ["ok"] * 4
    assert {g.run_name: os.path.getmtime(os.path.join(tmp_path, g.run_name, "metrics.json")) for g in again} == mtimes
    assert storage_target(str(tmp_path)).uri == str(tmp_path)
    # resumed with other rows and seeds: the stored grid is not restored (its trials are the old pairs); the new
    # pair trains, the finished ones come back by name untouched, and resuming the new grid restores it
    more = S.run_grid([("full", base)], [1, 2, 3], name="st", storage_path=str(tmp_path), resume=True)
    assert [(g.row, g.seed, g.status) for g in more] == [("full", 1, "ok"), ("full", 2, "ok"), ("full", 3, "ok")]
    assert more[2].metrics["seed"] == 3 and len(more[2].history) == 1
    assert {g.run_name: os.path.getmtime(os.path.join(tmp_path, g.run_name, "metrics.json"))
            for g in more[:2]} == {k: v for k, v in mtimes.items() if "-full-" in k}
    assert json.loads((tmp_path / "st" / S.GRID_SPEC).read_text()) == {"rows": ["full"], "seeds": [1, 2, 3]}
    same = S.run_grid([("full", base)], [1, 2, 3], name="st", storage_path=str(tmp_path), resume=True)
    assert [g.status for g in same] == ["ok"] * 3


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_on_a_study_exits_130_and_writes_no_table(ray_cluster, shards, tmp_path):
    """SIGINT to `psamf study` (Ctrl+C) while its first run trains: Tune stops the grid; the study used to call the
    missing runs "failed", write and print a partial table and exit 0. Now: status 130, the resume hint, no
    study.md or study.json."""
    from tests.helpers import ctrl_c_when

    uri, _ = shards
    args = ["study", "ablations", "--preset", "tiny", "--rows", "full,no_ps", "--seeds", "1,2", "--name", "intr",
            f"data.uri={uri}", f"run.storage_path={tmp_path}", "run.num_workers=0", "optim.epochs=200",
            "optim.early_stop_patience=500"]
    rc, out = ctrl_c_when(args, tmp_path / "study.log",
                          lambda: any(p.stat().st_size > 2 for p in tmp_path.glob("intr-*/history.json")))
    assert rc == 130, out[-3000:]
    assert "psamf study: intr: interrupted with 0 of 4 run(s) finished" in out and "with --resume" in out
    assert not (tmp_path / "intr" / "study.md").exists() and not (tmp_path / "intr" / "study.json").exists()
    assert "(reference)" not in out  # no table printed


@pytest.mark.integration
def test_a_grid_row_without_workers_trains_in_its_trial_and_matches_a_one_worker_row(ray_cluster, shards, tmp_path,
                                                                                        capfd):
    """The same run as a one-worker Ray Train run and in the trial's own process (run.num_workers=0; Ray Train's
    local mode would fail inside a Tune trial): both rows finish with the same test metrics (same seed, same data
    order, one process each), and only the first leaves Ray Train's run state behind."""
    uri, _ = shards
    base = Config.from_preset("tiny").override([f"data.uri={uri}", "run.num_workers=1", "optim.epochs=2",
                                                 "run.max_failures=0"])
    grid = S.run_grid([("group", base), ("own", base.override(["run.num_workers=0"]))], [1], name="g",
                      storage_path=str(tmp_path))
    assert [(g.row, g.status) for g in grid] == [("group", "ok"), ("own", "ok")], [g.error for g in grid]
    group, own = (g.metrics["test"] for g in grid)
    for k in ("mae", "corr", "acc7", "acc2_non0"):
        assert own[k] == pytest.approx(group[k], abs=1e-5), k
    assert [len(g.history) for g in grid] == [2, 2]
    assert (tmp_path / "g-group-seed1" / "checkpoint_manager_snapshot.json").exists()
    assert not (tmp_path / "g-own-seed1" / "checkpoint_manager_snapshot.json").exists()
    assert grid[1].metrics.get("controller_poll_s") is None
    # the console: one line per ended run, with its validation and test MAE, and not Ray Tune's own box
    out = capfd.readouterr().out
    for g in grid:
        line = next((ln for ln in out.splitlines() if ln.startswith(f"run {g.run_name}: finished")), None)
        assert line is not None and f"test_mae={g.metrics['test']['mae']:.4f}" in line, out
    assert "Configuration for experiment" not in out
