"""Unit tests for psamf.train / psamf.evaluate / psamf.outputs without a Ray cluster: train_step, evaluate,
checkpoint round trip, optimiser groups, plateau schedule, selection + early stopping (checked against Ray's own
checkpoint-retention order), preflight checks, CLI parsing, output writers."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch

from psamf import checkpoint, engine, preflight, results
from psamf import train as T
from psamf.commands import train as train_cmd
from psamf.config import Config, ConfigError
from psamf.model import build_model
from tests.helpers import fake_manifest, make_batch, tiny_cfg

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cfg() -> Config:
    return tiny_cfg()


def _model(cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg.model)


def _batch(cfg: Config, B: int = 6, seed: int = 0, start: int = 0) -> dict:
    b = make_batch(cfg.model, B=B, seed=seed)
    b["sample_id"] = [f"v{start + i}$_$0" for i in range(B)]
    b["index"] = torch.arange(start, start + B)
    return b


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- AMP
def test_resolve_amp_is_off_on_cpu_unless_forced():
    assert engine.resolve_amp("auto", "cpu") is None
    assert engine.resolve_amp("off", "cpu") is None
    assert engine.resolve_amp("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ConfigError):
        engine.resolve_amp("fp8", "cpu")


# ----------------------------------------------------------------------------- train_step
def test_train_step_updates_weights_and_returns_every_term(cfg):
    model = _model(cfg)
    opt = engine.build_optimizer(model, cfg.optim)
    before = _params(model)
    stats = engine.train_step(model, _batch(cfg), opt, cfg)
    assert {"total", "l1", "ccl", "ps", "clm", "grad_norm", "batch_size"} <= set(stats)
    assert stats["batch_size"] == 6 and all(math.isfinite(stats[k]) for k in ("total", "l1", "grad_norm"))
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("text_bert.") for k in changed) and any(k.startswith("fusion_prj.") for k in changed)
    # the frozen personality encoder never moves
    assert not [k for k in changed if k.startswith("personality_enc.")]


def test_every_trainable_parameter_gets_a_gradient(cfg):
    """DDP runs with find_unused_parameters=False: a trainable parameter without a gradient would hang it.
    Checked for the tiny preset, a tiny model with the paper's switches, and every ablation."""
    from psamf.config import ABLATIONS, ablate

    paper_like = tiny_cfg(cross_block="transformer", separate_queries=True, prefusion_input="cls",
                          personality_tokens=False, sim_mode="per_sample_dissimilarity")
    for c in (cfg, paper_like, *(ablate(cfg, name) for name in ABLATIONS)):
        model = _model(c)
        opt = engine.build_optimizer(model, c.optim)
        engine.train_step(model, _batch(c), opt, c)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing


def test_train_step_overfits_a_fixed_batch(cfg):
    model = _model(cfg)
    opt = engine.build_optimizer(model, cfg.optim)
    batch = _batch(cfg, B=8)
    first = engine.train_step(model, batch, opt, cfg)["l1"]
    for _ in range(40):
        last = engine.train_step(model, batch, opt, cfg)["l1"]
    assert last < 0.5 * first


def test_grad_clipping_bounds_the_update(cfg):
    c = cfg.override(["optim.grad_clip=0.01"])
    model = _model(c)
    opt = engine.build_optimizer(model, c.optim)
    engine.train_step(model, _batch(c), opt, c)
    norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm <= 0.01 * 1.001


def test_train_step_bf16_autocast_on_cpu_runs(cfg):
    model = _model(cfg)
    opt = engine.build_optimizer(model, cfg.optim)
    stats = engine.train_step(model, _batch(cfg), opt, cfg, amp_dtype=torch.bfloat16)
    assert math.isfinite(stats["total"])


def test_predictions_stay_float32_under_bf16_autocast(cfg):
    """The regression head runs outside autocast: a bf16 prediction would be quantised (steps of 2^-7 near 1)."""
    model = _model(cfg).eval()
    batch = engine.move_to_device(_batch(cfg), None)
    from psamf.model import model_inputs

    with torch.no_grad():
        ref = model(**model_inputs(batch)).prediction
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**model_inputs(batch))
    assert ref.dtype == out.prediction.dtype == torch.float32
    assert out.fused.dtype == torch.bfloat16  # the rest of the model did run in bf16
    assert torch.allclose(out.prediction, ref, atol=0.1)


def test_non_finite_loss_raises_before_the_update(cfg):
    model = _model(cfg)
    opt = engine.build_optimizer(model, cfg.optim)
    batch = _batch(cfg)
    batch["label"][0] = float("nan")
    before = _params(model)
    with pytest.raises(FloatingPointError, match="non-finite"):
        engine.train_step(model, batch, opt, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _manual_accumulated_update(cfg, model, opt, groups):
    """The update gradient accumulation must make: per group, the mean of each batch's gradient (each batch
    its own forward and backward, as in the epoch loop), clipped, one Adam step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for group in groups:
        acc = [torch.zeros_like(p) for p in trainable]
        for b in group:
            opt.zero_grad(set_to_none=True)
            out = model(**engine.model_inputs(engine.move_to_device(b, None)))
            engine.compute_losses(out, b["label"].float(), cfg.loss, cfg.model)["total"].backward()
            for a, p in zip(acc, trainable):
                if p.grad is not None:
                    a += p.grad
        for a, p in zip(acc, trainable):
            p.grad = a / len(group)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
        opt.step()


def test_gradient_accumulation_steps_once_per_group_on_the_mean_gradient(cfg):
    """grad_accum=2 over 5 batches: steps after batches 2, 4 and 5 (a short last group steps on its own mean)."""
    c = cfg.override(["optim.grad_accum=2"])
    batches = [_batch(c, B=6, seed=s, start=6 * s) for s in range(5)]
    model = _model(c)
    opt = engine.build_optimizer(model, c.optim)
    torch.manual_seed(3)
    st = engine.train_epoch(model, batches, opt, c)
    assert (st.steps, st.optimizer_steps, st.n, len(st.grad_norms)) == (5, 3, 30, 3)

    ref = _model(c)
    ref_opt = engine.build_optimizer(ref, c.optim)
    ref.train()
    torch.manual_seed(3)  # the same dropout draws, batch by batch
    _manual_accumulated_update(c, ref, ref_opt, [batches[0:2], batches[2:4], batches[4:5]])
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    # and it differs from stepping after every batch
    plain = _model(c)
    engine.train_epoch(plain, batches, engine.build_optimizer(plain, c.optim), cfg)
    assert any(not torch.allclose(a, b) for a, b in zip(model.parameters(), plain.parameters()))


def test_the_optimizer_is_the_fused_adam_on_the_cpu_too(cfg):
    """engine.build_optimizer: torch's fused Adam wherever it runs (CPU included), with the two learning rates."""
    opt = engine.build_optimizer(_model(cfg), cfg.optim)
    assert opt.defaults["fused"] is True
    assert sorted(g["lr"] for g in opt.param_groups) == sorted([cfg.optim.lr_bert, cfg.optim.lr_main])


def test_epoch_record_reports_the_padded_token_share_of_the_collated_batches(cfg):
    """The collate's host-side `text_tokens` (real tokens, token positions) add up over ranks into the history's
    `train_padded_token_frac`; batches without it (hand-made) leave the key out."""
    batches = [_batch(cfg, B=4, seed=s, start=4 * s) for s in range(3)]
    for b in batches:
        b["text_tokens"] = (int(b["attention_mask"].sum()), b["attention_mask"].numel())
    model = _model(cfg)
    opt = engine.build_optimizer(model, cfg.optim)
    st = engine.train_epoch(model, batches, opt, cfg)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["attention_mask"].numel() for b in batches)
    assert (st.tokens, st.token_slots) == (real, slots) and real < slots
    other = engine.EpochStats(n=4, time=1.0, tokens=10, token_slots=40)
    rec = engine.epoch_record(0, st, [st, other], opt)
    assert rec["train_padded_token_frac"] == pytest.approx(1 - (real + 10) / (slots + 40))
    st2 = engine.train_epoch(model, [_batch(cfg, B=4, seed=9)], opt, cfg)
    assert "train_padded_token_frac" not in engine.epoch_record(1, st2, [st2], opt)


def test_fp16_steps_with_a_loss_scaler_whose_state_the_checkpoint_keeps(cfg, tmp_path):
    c = cfg.override(["optim.amp=fp16"])
    dtype = engine.resolve_amp(c.optim.amp, "cpu")
    assert dtype == torch.float16 and engine.make_scaler(torch.bfloat16, "cpu") is None
    model = _model(c)
    opt = engine.build_optimizer(model, c.optim)
    scaler = engine.make_scaler(dtype, "cpu")
    before = _params(model)
    st = engine.train_epoch(model, [_batch(c, seed=s) for s in range(3)], opt, c, amp_dtype=dtype, scaler=scaler)
    assert st.optimizer_steps == 3 and all(math.isfinite(v / st.n) for v in st.sums.values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the scaler let steps through
    scaler.update(new_scale=1024.0)  # a scale that differs from a fresh scaler's
    sched = engine.build_scheduler(opt, c.optim)
    sel = engine.Selector(c.optim.select_metric, c.optim.select_mode, None)
    sel.update(0, 1.0)
    checkpoint.save_checkpoint(str(tmp_path), model=model, optimizer=opt, scheduler=sched, selector=sel, epoch=0,
                               history=[{"epoch": 0}], cfg=c, scaler=scaler)
    fresh = engine.make_scaler(dtype, "cpu")
    assert fresh.get_scale() != 1024.0
    checkpoint.load_checkpoint(str(tmp_path), scaler=fresh)
    assert fresh.get_scale() == 1024.0


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_is_deterministic_and_partitions_cover_each_sample_once(cfg):
    model = _model(cfg)
    batches = [_batch(cfg, B=5, seed=s, start=5 * s) for s in range(4)]
    full = engine.EvalOutput.merge([engine.evaluate(model, batches, cfg)])
    assert full.n == 20 and len(set(full.ids)) == 20 and model.training  # mode restored
    again = engine.EvalOutput.merge([engine.evaluate(model, batches, cfg)])
    np.testing.assert_array_equal(full.pred, again.pred)
    # two "ranks", each keeping its hash partition of the same stream, gathered = the full evaluation
    parts = [engine.evaluate(model, batches, cfg, keep=engine.eval_partition(r, 2)) for r in range(2)]
    assert 0 < parts[0].n < 20 and parts[0].n + parts[1].n == 20
    merged = engine.EvalOutput.merge(parts)
    assert merged.ids == full.ids
    np.testing.assert_allclose(merged.pred, full.pred, atol=1e-5)
    np.testing.assert_array_equal(merged.label, full.label)
    # a sample counted twice is an error, not a silently skewed metric
    with pytest.raises(RuntimeError, match="more than once"):
        engine.EvalOutput.merge([parts[0], parts[0]])


def test_eval_metrics_val_loss_is_the_per_sample_l1(cfg):
    model = _model(cfg)
    out = engine.EvalOutput.merge([engine.evaluate(model, [_batch(cfg, B=4), _batch(cfg, B=3, seed=1, start=4)], cfg)])
    m = engine.eval_metrics(out, "mosi")
    mae = float(np.mean(np.abs(out.pred.astype(np.float64) - out.label)))
    assert m["val_loss"] == pytest.approx(mae) and m["val_mae"] == pytest.approx(mae, rel=1e-6)
    assert m["val_l1"] == pytest.approx(mae, rel=1e-5)  # batch means weighted by batch size = per-sample mean
    assert m["val_n"] == 7 and {"val_total", "val_ccl", "val_ps", "val_clm", "val_corr", "val_acc7"} <= set(m)
    assert "val_loss" in engine.selectable_metrics("mosi") and "val_acc3" in engine.selectable_metrics("sims")
    assert "val_n" not in engine.selectable_metrics("mosi")


# ----------------------------------------------------------------------------- optimiser, schedule
def test_param_groups_cover_trainable_parameters_once_with_their_lrs(cfg):
    model = _model(cfg)
    opt = engine.build_optimizer(model, cfg.optim)
    lrs = engine.group_lrs(opt)
    assert lrs == {"lr_bert": cfg.optim.lr_bert, "lr_main": cfg.optim.lr_main}
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) and set(ids) == set(trainable)
    bert = {id(p) for p in model.text_bert.parameters()}
    assert bert <= {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == cfg.optim.weight_decay_bert


def test_plateau_scheduler_halves_both_lrs_after_patience(cfg):
    c = cfg.override(["optim.plateau_patience=1", "optim.plateau_factor=0.5"])
    opt = engine.build_optimizer(_model(c), c.optim)
    sched = engine.build_scheduler(opt, c.optim)
    for v in (1.0, 1.0, 1.0):  # no improvement for 2 epochs > patience 1
        sched.step(v)
    assert engine.group_lrs(opt) == {"lr_bert": c.optim.lr_bert / 2, "lr_main": c.optim.lr_main / 2}


# ----------------------------------------------------------------------------- selection / early stopping
def test_selector_min_max_ties_nan_and_patience():
    s = engine.Selector("val_loss", "min", patience=2)
    assert s.update(0, 1.0) and s.update(1, 0.8)
    assert not s.update(2, 0.9) and not s.should_stop
    assert s.update(3, 0.8)  # tie: the later epoch is selected ...
    assert s.best_epoch == 3 and s.bad_epochs == 2 and s.should_stop  # ... but it is not an improvement
    s2 = engine.Selector("val_acc2_non0", "max", patience=None)
    assert s2.update(0, float("nan")) and s2.update(1, 0.5) and not s2.update(2, float("nan"))
    assert s2.best_epoch == 1 and not s2.should_stop
    s3 = engine.Selector("val_acc2_non0", "max")
    s3.load_state_dict(s2.state_dict())
    assert (s3.best, s3.best_epoch, s3.bad_epochs) == (0.5, 1, 1)
    with pytest.raises(ConfigError, match="select_metric"):
        engine.Selector("val_loss", "min").load_state_dict(s2.state_dict())


@pytest.mark.parametrize("mode", ["min", "max"])
def test_selected_epoch_is_always_among_the_checkpoints_ray_keeps(tmp_path, mode):
    """Replays random score sequences (ties, NaN) through Ray's checkpoint manager: the selected epoch is Ray's
    best, and with num_to_keep=1 both the selected and the latest checkpoint survive."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    rng = random.Random(0)
    for trial in range(30):
        mgr = _CheckpointManager(CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_x",
                                                  checkpoint_score_order=mode))
        sel = engine.Selector("val_x", mode)
        kept = {}
        for epoch in range(8):
            v = rng.choice([0.1, 0.2, 0.3, float("nan")])
            sel.update(epoch, v)
            d = tmp_path / f"t{trial}_{mode}_{epoch}"
            d.mkdir()
            ck = Checkpoint.from_directory(str(d))
            kept[ck.path] = epoch
            mgr.register_checkpoint(_TrainingResult(checkpoint=ck, metrics={"val_x": v, "epoch": epoch}))
            alive = {kept[p] for p in kept if os.path.exists(p)}
            assert sel.best_epoch in alive and epoch in alive, (trial, epoch, alive)
            assert mgr.best_checkpoint_result.metrics["epoch"] == sel.best_epoch


# ----------------------------------------------------------------------------- checkpoints, RNG
def test_rng_state_round_trip():
    engine.seed_everything(3)
    state = engine.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    engine.seed_everything(99)
    engine.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_checkpoint_round_trip_resumes_identically(cfg, tmp_path):
    model = _model(cfg)
    opt = engine.build_optimizer(model, cfg.optim)
    sched = engine.build_scheduler(opt, cfg.optim)
    sel = engine.Selector(cfg.optim.select_metric, cfg.optim.select_mode, 3)
    engine.train_step(model, _batch(cfg), opt, cfg)
    sched.step(1.0)
    sel.update(0, 1.0)
    history = [{"epoch": 0, "val_loss": 1.0, "val_corr": float("nan")}]
    engine.seed_everything(5)
    checkpoint.save_checkpoint(str(tmp_path), model=model, optimizer=opt, scheduler=sched, selector=sel, epoch=0,
                      history=history, cfg=cfg, rng_states=[engine.rng_state()], session=2, metrics=history[0])
    assert {"model.pt", "train_state.pt", "config.yaml", "meta.json"} <= set(os.listdir(tmp_path))
    assert checkpoint.checkpoint_config(str(tmp_path)).to_dict() == cfg.to_dict()

    # continue the original for one step
    torch.manual_seed(11)
    engine.train_step(model, _batch(cfg, seed=2), opt, cfg)
    # restore into fresh objects and take the same step
    model2 = _model(cfg, seed=123)
    opt2 = engine.build_optimizer(model2, cfg.optim)
    sched2 = engine.build_scheduler(opt2, cfg.optim)
    sel2 = engine.Selector(cfg.optim.select_metric, cfg.optim.select_mode, 3)
    state = checkpoint.load_checkpoint(str(tmp_path), model=model2, optimizer=opt2, scheduler=sched2, selector=sel2)
    assert state["epoch"] == 0 and state["session"] == 2 and sel2.best_epoch == 0
    assert state["history"][0]["epoch"] == 0 and math.isnan(state["history"][0]["val_corr"])
    assert sched2.state_dict() == sched.state_dict()
    torch.manual_seed(11)
    engine.train_step(model2, _batch(cfg, seed=2), opt2, cfg)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["epoch"] == 0 and meta["select_metric"] == cfg.optim.select_metric
    # the epoch a worker starts its first pass at before the model exists: from meta.json alone
    import pyarrow.fs as pafs
    import ray.train

    assert T._next_epoch_hint(ray.train.Checkpoint(str(tmp_path), filesystem=pafs.LocalFileSystem())) == 1
    assert T._next_epoch_hint(None) == 0
    os.remove(tmp_path / "meta.json")
    assert T._next_epoch_hint(ray.train.Checkpoint(str(tmp_path), filesystem=pafs.LocalFileSystem())) == -1


def test_the_trainer_gets_both_failure_limits_from_the_run_config(cfg, tmp_path):
    """run.max_failures bounds worker-group restarts; run.controller_failure_limit bounds worker-group starts that
    time out (Ray retries those forever by default: a job whose nodes never come would never end)."""
    from psamf.storage import resolve

    c = cfg.override([f"run.storage_path={tmp_path}", "run.max_failures=1", "run.controller_failure_limit=3"])
    fc = T.build_trainer(c, {}, resolve(str(tmp_path)), counts={"valid": 1, "test": 1}).run_config.failure_config
    assert (fc.max_failures, fc.controller_failure_limit) == (1, 3)
    default = T.build_trainer(cfg.override([f"run.storage_path={tmp_path}"]), {}, resolve(str(tmp_path)),
                              counts={"valid": 1, "test": 1}).run_config.failure_config
    assert default.controller_failure_limit == -1


# ----------------------------------------------------------------------------- preflight (no Ray)
def test_preflight_takes_dims_from_the_manifest(cfg, tmp_path):
    c = cfg.override([f"run.storage_path={tmp_path}"])
    pf = preflight.preflight(c, manifest=fake_manifest())
    assert (pf.cfg.model.audio_dim, pf.cfg.model.visual_dim) == (7, 9)
    assert pf.storage.root == str(tmp_path) and pf.cfg.preset == "tiny"


@pytest.mark.parametrize("override,manifest,match", [
    (["optim.select_metric=val_bogus"], {}, "select_metric"),
    (["model.vocab_size=100"], {}, r"model\.vocab_size=100 is smaller"),
    (["model.personality_vocab_size=100"], {}, r"personality_vocab_size"),
    (["data.tokenizer=bert-base-uncased"], {}, "tokenised with 'psamf:tiny'"),
    (["data.dataset=mosei"], {}, "hold 'mosi'"),
    (["optim.batch_size=128"], {}, r"fewer than optim\.batch_size"),
    ([], {"counts": {"train": 200, "valid": 0, "test": 40}}, "no 'valid' split"),
])
def test_preflight_rejects_bad_configs(cfg, tmp_path, override, manifest, match):
    c = cfg.override([f"run.storage_path={tmp_path}", *override])
    with pytest.raises(ConfigError, match=match):
        preflight.preflight(c, manifest=fake_manifest(**manifest))


def test_selecting_on_an_in_batch_loss_term_with_several_workers_is_warned_about(cfg, tmp_path, caplog):
    """val_ccl/val_clm/val_ps/val_total depend on how a validation batch is divided among the workers."""
    c = cfg.override([f"run.storage_path={tmp_path}", "optim.select_metric=val_total"])
    with caplog.at_level("WARNING", logger="psamf.preflight"):
        preflight.preflight(c.override(["run.num_workers=1"]), manifest=fake_manifest(), check_resources=False)
        assert "in-batch loss term" not in caplog.text
        preflight.preflight(c.override(["run.num_workers=2"]), manifest=fake_manifest(), check_resources=False)
        assert "select_metric=val_total is an in-batch loss term" in caplog.text
        caplog.clear()
        preflight.preflight(c.override(["run.num_workers=2", "optim.select_metric=val_loss"]),
                            manifest=fake_manifest(), check_resources=False)
        assert "in-batch loss term" not in caplog.text


def test_preflight_refuses_to_resume_a_run_with_another_model(cfg, tmp_path):
    c = cfg.override([f"run.storage_path={tmp_path}", "run.name=r1"])
    pf = preflight.preflight(c, manifest=fake_manifest())
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "config.yaml").write_text(pf.cfg.to_yaml())
    (tmp_path / "r1" / "checkpoint_epoch=000").mkdir()  # a run holds its name once it has a checkpoint
    preflight.preflight(c.override(["optim.epochs=9"]), manifest=fake_manifest())  # more epochs: a resume, fine
    with pytest.raises(ConfigError, match=r"already exists.*model\.hidden_size"):
        preflight.preflight(c.override(["model.hidden_size=64", "model.num_attention_heads=2"]),
                            manifest=fake_manifest())


# ----------------------------------------------------------------------------- CLI, jobs entrypoint
def test_cli_config_parsing(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    train_cmd.add_arguments(p)
    args = p.parse_args(["--preset", "tiny", "--run-name", "abc", "--seeds", "1,2,3", "optim.epochs=3"])
    cfg = train_cmd.config_from_args(args)
    assert cfg.run.name == "abc" and cfg.optim.epochs == 3 and cfg.preset == "tiny"
    assert train_cmd.parse_seeds(args.seeds) == [1, 2, 3]
    with pytest.raises(ConfigError):
        train_cmd.parse_seeds("1,x")
    assert T.seed_config(cfg, 7).run.name == "abc-seed7" and T.seed_config(cfg, 7).optim.seed == 7
    y = tmp_path / "c.yaml"
    y.write_text("preset: tiny\noptim:\n  epochs: 2\n")
    assert train_cmd.config_from_args(p.parse_args(["--config", str(y)])).optim.epochs == 2


def test_jobs_train_entrypoint_parses_and_fails_cleanly_on_bad_config(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("jobs_train", os.path.join(os.path.dirname(__file__), "..",
                                                                            "jobs", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    called = {}
    monkeypatch.setattr(train_cmd, "train", lambda cfg, seeds=None: called.setdefault("cfg", cfg) and (_ for _ in ()).throw(
        ConfigError("stop here")))
    assert mod.main(["--preset", "tiny", "--run-name", "j1", "optim.epochs=2"]) == 2
    assert called["cfg"].run.name == "j1" and called["cfg"].optim.epochs == 2
    assert mod.main(["--preset", "tiny", "optim.nope=1"]) == 2
    assert "optim.nope" in capsys.readouterr().err


# ----------------------------------------------------------------------------- outputs
def test_outputs_are_written_atomically_and_readably(tmp_path):
    import pyarrow.parquet as pq

    from psamf import outputs as O
    from psamf import storage as S

    st = S.resolve(str(tmp_path / "runs"))
    run_dir = st.run_dir("r")
    hist = [{"epoch": e, "train_total": 2.0 - e / 10, "train_l1": 1.0, "val_loss": 1.0 - e / 10, "val_mae": 1.0,
             "val_corr": float("nan") if e == 0 else 0.5, "val_acc2_non0": 0.6, "lr_bert": 1e-3, "lr_main": 3e-3}
            for e in range(3)]
    O.write_history(st.fs, run_dir, hist)
    tb = O.write_tensorboard(st.fs, run_dir, hist, final={"selected_epoch": 2, "test": {"mae": 0.9}})
    first = os.listdir(tb)
    O.write_tensorboard(st.fs, run_dir, hist)
    assert len(first) == 1 and len(os.listdir(tb)) == 1  # rewritten, not appended
    png = O.plot_curves(hist, selected_epoch=2)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    O.write_predictions(st.fs, f"{run_dir}/p.parquet", [("valid", ["a", "b"], [0.5, -1], [0.1, 0.2]),
                                                         ("test", ["c"], [1.0], [0.7])])
    t = pq.read_table(f"{run_dir}/p.parquet").to_pydict()
    assert t["sample_id"] == ["a", "b", "c"] and t["split"] == ["valid", "valid", "test"]
    S.write_json(st.fs, f"{run_dir}/m.json", {"x": float("nan"), "y": np.float32(1.5)})
    assert json.loads(open(f"{run_dir}/m.json").read()) == {"x": None, "y": 1.5}
    assert not [f for f in os.listdir(run_dir) if ".tmp-" in f]


def test_storage_target_for_s3_with_custom_endpoint_drops_the_scheme():
    from psamf.storage import resolve

    st = resolve("s3://bucket/runs", "http://127.0.0.1:9")
    assert st.storage_path == "bucket/runs" and st.storage_filesystem is not None
    assert st.run_dir("r") == "bucket/runs/r" and st.run_uri("r") == "s3://bucket/runs/r"


def _open_checkpoint_repeatedly(ckpt, n: int, use_ray_as_directory: bool, rank: int) -> list[float]:
    """Runs in a child process, like one DDP rank restoring: open the checkpoint, do other work for a moment
    (building the model), then read the tensor file; `n` times, each rank starting a little later."""
    import time

    time.sleep(0.15 * rank)
    sums = []
    for _ in range(n):
        ctx = ckpt.as_directory() if use_ray_as_directory else checkpoint.open_checkpoint(ckpt)
        with ctx as d:
            time.sleep(0.2)
            sums.append(float(torch.load(os.path.join(d, "state.pt"), weights_only=True)["w"].sum()))
    return sums


def _s3_checkpoint(tmp_path, s3_bucket, s3_server, n: int = 1000):
    from ray.train import Checkpoint

    from psamf.storage import s3_filesystem

    fs = s3_filesystem(s3_server)
    src = tmp_path / "ckpt"
    src.mkdir()
    w = torch.arange(n, dtype=torch.float32)
    torch.save({"w": w}, src / "state.pt")
    (src / "extra.json").write_text("{}")
    import pyarrow.fs as pafs

    pafs.copy_files(str(src), f"{s3_bucket}/ckpt", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return Checkpoint(f"{s3_bucket}/ckpt", filesystem=fs), float(w.sum())


@pytest.mark.integration
def test_local_checkpoint_reads_local_in_place_and_remote_into_a_private_directory(tmp_path, s3_bucket, s3_server):
    from ray.train import Checkpoint

    local = tmp_path / "local"
    local.mkdir()
    with checkpoint.open_checkpoint(Checkpoint.from_directory(str(local))) as d:
        assert d == str(local)
    assert local.exists()  # never removed

    ckpt, _ = _s3_checkpoint(tmp_path, s3_bucket, s3_server)
    with checkpoint.open_checkpoint(ckpt) as d1, checkpoint.open_checkpoint(ckpt) as d2:
        assert d1 != d2  # one directory per opening, so no opener can rewrite another's files
        assert sorted(os.listdir(d1)) == sorted(os.listdir(d2)) == ["extra.json", "state.pt"]
    assert not os.path.exists(d1) and not os.path.exists(d2)  # cleaned up


@pytest.mark.integration
def test_ranks_restoring_the_same_s3_checkpoint_at_once_all_read_it_whole(tmp_path, s3_bucket, s3_server):
    """What two DDP ranks on one node do when a run resumes from S3 (the CI failure this guards against:
    "PytorchStreamReader failed reading file" from Ray's shared as_directory() download). The file is 160 MB,
    more than one of Ray's 64 MB download chunks; with `use_ray_as_directory=True` this setup failed in 1 of 3
    trials on a 2-core machine."""
    import multiprocessing as mp

    ckpt, expected = _s3_checkpoint(tmp_path, s3_bucket, s3_server, n=40_000_000)
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_open_checkpoint_repeatedly, [(ckpt, 4, False, rank) for rank in range(3)])
    assert [len(r) for r in results] == [4, 4, 4]
    assert all(s == expected for r in results for s in r)


def test_cli_takes_overrides_before_and_after_options(capsys):
    from psamf import cli

    parser = cli.build_parser("evaluate")
    for argv in (["evaluate", "runs/r", "data.uri=x", "--out", "m.json"],
                 ["evaluate", "runs/r", "--out", "m.json", "data.uri=x"]):
        args = cli.parse_args(parser, argv)
        assert args.checkpoint == "runs/r" and args.out == "m.json" and args.overrides == ["data.uri=x"]
    # the `ray job submit` entry points parse the same way
    args = cli.parse_args(cli.command_parser("train", prog="jobs/train.py"),
                          ["--preset", "tiny", "optim.epochs=3", "--run-name", "r", "optim.batch_size=8"])
    assert args.overrides == ["optim.epochs=3", "optim.batch_size=8"] and args.run_name == "r"
    with pytest.raises(SystemExit):  # plain argparse refuses the second group of overrides
        cli.command_parser("train").parse_args(["--preset", "tiny", "optim.epochs=3", "--run-name", "r",
                                              "optim.batch_size=8"])
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "runs/r", "--out", "m.json", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "runs/r", "--out", "m.json", "notakeyvalue"])
    assert "unrecognized arguments: notakeyvalue" in capsys.readouterr().err
    # and the config command resolves overrides given after its options
    assert cli.main(["config", "--preset", "tiny", "optim.epochs=7"]) == 0
    assert "epochs: 7" in capsys.readouterr().out
    assert cli.main(["config", "optim.epochs=5", "--preset", "tiny", "optim.batch_size=9"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 5" in out and "batch_size: 9" in out


def test_history_printer_prints_each_new_epoch_once_and_skips_those_of_a_resumed_run(tmp_path):
    import io
    import time

    import pyarrow.fs as pafs

    from psamf.outputs import write_history

    fs, run_dir = pafs.LocalFileSystem(), str(tmp_path / "myrun")
    os.makedirs(run_dir)
    rec = lambda e: {"epoch": e, "train_total": 1.0 / (e + 1), "val_loss": 0.5, "time_train_s": 2.0,  # noqa: E731
                     "is_best": e == 1}
    write_history(fs, run_dir, [rec(0)])  # a resumed run: epoch 0 is already there
    out = io.StringIO()
    with results.HistoryPrinter(fs, run_dir, "val_loss", interval_s=0.05, out=out):
        write_history(fs, run_dir, [rec(0), rec(1)])
        deadline = time.monotonic() + 30
        while "epoch 1" not in out.getvalue():  # printed by the background thread, while the run goes on
            assert time.monotonic() < deadline, "the printer's thread did not print epoch 1"
            time.sleep(0.02)
        assert "epoch 2" not in out.getvalue()
        write_history(fs, run_dir, [rec(0), rec(1), rec(2)])  # the last one is caught by the final poll at exit
    lines = out.getvalue().splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["  [myrun] epoch 1", "  [myrun] epoch 2"]
    assert "val_loss=0.5" in lines[0] and lines[0].endswith("*best*") and not lines[1].endswith("*best*")


def test_in_epoch_progress_reaches_the_job_log_line_and_the_driver_console(tmp_path, cfg):
    """Issue 9 item 13: a long epoch shows its step, s/step and ETA (rank 0's log line for job logs, and
    progress.json, which the driver's printer shows on the quiet embedded Ray), once per new line."""
    import io

    import pyarrow.fs as pafs

    from psamf import train as T

    pf = results.ProgressFiles((str(tmp_path), None), "prun")
    seen = []
    hook = T._step_progress(pf, 0, n_train=24, batch_size=6, world=2)  # 2 full batches per rank
    T.PROGRESS_INTERVAL_S, old = 0.0, T.PROGRESS_INTERVAL_S
    try:
        model = _model(cfg)
        stats = engine.train_epoch(model, [_batch(cfg, seed=i) for i in range(2)], engine.build_optimizer(model, cfg.optim),
                                   cfg, on_step=lambda s, t: (seen.append(s), hook(s, t)))
    finally:
        T.PROGRESS_INTERVAL_S = old
    assert seen == [1, 2] and stats.steps == 2
    prog = json.loads((tmp_path / "prun" / "progress.json").read_text())
    assert prog["step"] == 2 and prog["steps"] == 2 and prog["line"].startswith("epoch 0: step 2/2, ")
    assert "ETA 0s" in prog["line"]
    out = io.StringIO()
    printer = results.HistoryPrinter(pafs.LocalFileSystem(), str(tmp_path / "prun"), "val_loss", out=out)
    printer.poll()
    printer.poll()  # the same line is not printed twice
    assert out.getvalue().splitlines() == [f"  [prun] {prog['line']}"]
    line = pf.step(0, 1, 10, 5.0)
    assert line == "epoch 0: step 1/10, 5.00 s/step, epoch ETA 45s"


def test_move_to_device_keeps_the_frame_lengths_on_the_host():
    """The LSTMs pack on the host: lengths copied to the device would be copied back (a sync per step)."""
    from psamf.engine import move_to_device
    from psamf.model import HOST_INPUT_KEYS
    from tests.helpers import make_batch, tiny_cfg

    moved = move_to_device(make_batch(tiny_cfg().model), torch.device("meta"))
    assert HOST_INPUT_KEYS == ("audio_lengths", "visual_lengths")
    assert all(moved[k].device.type == "cpu" for k in HOST_INPUT_KEYS)
    assert all(v.device.type == "meta" for k, v in moved.items() if k not in HOST_INPUT_KEYS)


def test_host_copy_holds_the_values_of_when_it_was_made():
    """The loss terms' copy is started before the backward pass and read after it (on a GPU the host then waits
    for the forward pass only): what it reads must be the values at the time of the copy, whatever runs since."""
    from psamf.engine import HostCopy

    t = torch.tensor([1.5, float("nan"), -2.0])
    copy = HostCopy(t)
    t.mul_(10)
    got = copy.tolist()
    assert got[0] == 1.5 and math.isnan(got[1]) and got[2] == -2.0


def test_forward_backward_reports_the_terms_it_backpropagated(cfg):
    """forward_backward's floats are the same loss terms as a separate forward computes, and its gradients are those
    of their total: reading the terms before the backward pass changes neither."""
    model = _model(cfg)
    batch = _batch(cfg)
    torch.manual_seed(5)
    terms = engine.compute_losses(model(**engine.model_inputs(batch)), batch["label"].float(), cfg.loss, cfg.model)
    terms["total"].backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    stats = engine.forward_backward(model, batch, cfg, torch.device("cpu"), None, None, 1.0)
    assert set(stats) == set(terms) | {"batch_size"} and stats["batch_size"] == batch["label"].shape[0]
    for k, v in terms.items():
        assert stats[k] == pytest.approx(float(v), rel=1e-6, abs=1e-7), k
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and got
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)


def test_release_memory_collects_what_a_finished_run_left_in_cycles():
    """A reused Tune trial actor calls it after each trial (bench/tune.py measures the resident set): the cycles a
    run leaves (a model referenced from its own hooks, say) are gone afterwards, not at the next collection."""
    import gc
    import weakref

    from psamf.engine import release_memory

    class Holder:
        pass

    gc.disable()
    try:
        h = Holder()
        h.me, h.weights = h, torch.zeros(1000)
        alive = weakref.ref(h)
        del h
        assert alive() is not None  # a cycle: reference counting alone does not free it
        release_memory()
        assert alive() is None
    finally:
        gc.enable()


def test_optim_compile_compiles_the_bert_layers_in_place():
    """optim.compile (off by default) wraps each BERT layer's forward with torch.compile without renaming the state
    dict; compiling itself is lazy (first forward), so this checks the config path only (the slow test below trains
    with it)."""
    from transformers.models.bert.modeling_bert import BertLayer

    from psamf.engine import maybe_compile
    from psamf.model import build_model
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg()
    assert cfg.optim.compile is False
    model = build_model(cfg.model)
    layers = [m for m in model.modules() if isinstance(m, BertLayer)]
    assert len(layers) == cfg.model.text_layers + cfg.model.multimodal_layers + cfg.model.personality_layers
    keys = list(model.state_dict())
    assert maybe_compile(model, cfg.optim) is model and all(m._compiled_call_impl is None for m in layers)
    on = cfg.override(["optim.compile=true"])
    assert maybe_compile(model, on.optim) is model and all(m._compiled_call_impl is not None for m in layers)
    assert model._compiled_call_impl is None  # not the whole model (see maybe_compile)
    assert list(model.state_dict()) == keys


@pytest.mark.slow
def test_optim_compile_trains_over_batches_of_varying_shapes_like_eager():
    """The training loop with optim.compile over batches whose token widths and frame counts all differ (as length-
    grouped batches do), through the switch to dynamic shapes: the epoch's loss and every shape's gradients follow
    the eager run's (dropout off: compiled dropout draws other masks)."""
    from psamf.engine import maybe_compile

    # without dropout: compiled dropout draws its masks from another random stream than eager
    cfg = tiny_cfg().override(["model.hidden_dropout=0", "model.attention_dropout=0", "model.head_dropout=0"])
    shapes = [(12, 30, 40), (9, 25, 33), (16, 20, 47), (7, 28, 21)]  # (tokens, audio frames, visual frames)
    batches = [make_batch(cfg.model, B=6, L=L, T_a=Ta, T_v=Tv, seed=i) for i, (L, Ta, Tv) in enumerate(shapes)]
    runs = []
    for compiled in (False, True):
        c = cfg.override([f"optim.compile={str(compiled).lower()}"])
        model = _model(c, seed=3)
        maybe_compile(model, c.optim)
        opt = engine.build_optimizer(model, c.optim)
        torch.manual_seed(0)
        st = engine.train_epoch(model, batches, opt, c)
        runs.append((st.sums["total"] / st.n, model, c))
    (loss_e, eager, c_e), (loss_c, compiled, c_c) = runs
    assert loss_c == pytest.approx(loss_e, rel=1e-4)
    # on the same weights, every shape's gradients agree (Adam's normalised steps would amplify rounding in the
    # weights after a few steps, so the weights themselves are not compared)
    compiled.load_state_dict(eager.state_dict())
    for b in batches:
        grads = []
        for model, c in ((eager, c_e), (compiled, c_c)):
            model.zero_grad(set_to_none=True)
            engine.forward_backward(model, b, c, torch.device("cpu"), None, None, 1.0)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-5, msg=n)
