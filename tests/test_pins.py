"""Numeric pins that protect refactors: with fixed seeds, the `tiny` model's predictions on a fixed batch, the
loss terms of one training step, and the demo's final test metrics must not move.

The values were recorded on the code before the package was restructured (issue 7) and must still hold after
it: a move of code that changes any of them changed behaviour. Tolerances are float32 round-off for the model
and the step, and the demo's four printed decimals for the end-to-end metrics. If a deliberate change of
behaviour moves them, re-record them in the same commit and say why in its message.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from psamf.model import build_model, model_inputs
from tests.helpers import make_batch, tiny_cfg

# recorded on 9f1b026 + Config.replace (before the restructure)
PRED_TINY = [0.4220200777053833, 0.401998907327652, 0.45826658606529236, 0.4813445508480072, 0.41922610998153687,
             0.45440182089805603]  # (6,) predictions of the tiny model, seed 0, fixed batch
STEP_TINY = {"total": 2.7242822647094727, "l1": 1.3981099128723145, "ccl": 0.90324866771698, "ps": 1.0039160251617432,
             "clm": 3.5836877822875977, "grad_norm": 16.975698471069336}  # one train step from that state
# re-recorded 2026-12-03: training's dropped short batch takes random rows of the last window instead of its longest
# transcripts (psamf.data._WindowCollate.batch_order); in the demo each rank drops 1 of 321 rows per epoch, and the
# batch order after it comes from the generator one draw later. The 3-epoch demo's test MAE moves by more than that
# between seeds: demo seeds 0-3, code before / after: 0.918 / 1.020, 0.903 / 0.885, 1.096 / 1.027, 0.943 / 0.990
# (differences of both signs, mean +0.016). Before: MAE 0.9176, Corr 0.7649 (2026-12-02, issue
# 11: length-grouped batches by default, the LSTMs over the padded batch, fused Adam; before that 1.0564, 0.7504).
DEMO_TEST = {"mae": 1.0199708046483924, "corr": 0.7740215394947333, "acc7": 0.30029154518950435,
             "acc5": 0.39941690962099125, "acc2_has0": 0.7463556851311953, "f1_has0": 0.7419711454632382,
             "acc2_non0": 0.7620481927710844, "f1_non0": 0.7578457943186613,
             "n": 343}  # test metrics of the demo, 3 epochs (tiny, 2 workers, seed 0)


def _fixed():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = make_batch(cfg.model, B=6, seed=0)
    return cfg, model, batch


def test_tiny_model_predictions_on_a_fixed_batch_are_pinned():
    torch.set_num_threads(1)
    cfg, model, batch = _fixed()
    model.eval()
    with torch.no_grad():
        pred = model(**model_inputs(batch)).prediction
    torch.testing.assert_close(pred, torch.tensor(PRED_TINY), atol=1e-5, rtol=1e-5)


def test_one_training_step_loss_terms_are_pinned():
    from psamf.engine import build_optimizer, train_step

    torch.set_num_threads(1)
    cfg, model, batch = _fixed()
    torch.manual_seed(1)  # dropout stream of the step
    stats = train_step(model, batch, build_optimizer(model, cfg.optim), cfg)
    got = {k: stats[k] for k in STEP_TINY}
    assert got == pytest.approx(STEP_TINY, abs=1e-5, rel=1e-5)


@pytest.mark.integration
@pytest.mark.slow
def test_demo_final_metrics_are_pinned(ray_cluster, tmp_path, capsys):
    from psamf.commands import demo

    args = argparse.Namespace(workdir=str(tmp_path / "data"), storage=str(tmp_path / "runs"), run_name="pin",
                              resume=False, scale=0.5, epochs=3, workers=2, seed=0, search=False)
    assert demo.run(args) == 0
    import json

    metrics = json.loads((tmp_path / "runs" / "pin" / "metrics.json").read_text())
    got = {k: metrics["test"][k] for k in DEMO_TEST}
    assert got == pytest.approx(DEMO_TEST, abs=5e-5)
    # the chance levels recorded agree with the history written, and the demo names exactly the terms at chance
    from psamf.config import Config

    history = json.loads((tmp_path / "runs" / "pin" / "history.json").read_text())
    level = 2 * math.log(Config.from_preset("tiny").optim.batch_size)
    clm = metrics["terms_at_chance"]["terms"]["clm"]
    assert clm["level"] == pytest.approx(level) and clm["last"] == history[-1]["train_clm"]
    assert clm["at_chance"] == all(abs(r["train_clm"] - level) <= 0.05 * level for r in history)
    printed = [line for line in capsys.readouterr().out.splitlines() if "at their chance level" in line]
    at_chance = [t for t, c in metrics["terms_at_chance"]["terms"].items() if c["at_chance"]]
    assert len(printed) == (1 if at_chance else 0)
    assert all(f"{t} " in printed[0] for t in at_chance)
