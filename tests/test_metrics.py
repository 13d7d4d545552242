"""Metrics against hand-computed values (docs/data-formats.md §7–§8).

Every expected number below is worked out by hand in the comments; none comes from the function under test.
Inputs are cast to float32 by the metrics (as MMSA does), so values such as 1.2 carry ~1e-7 error: MAE/Corr are
compared with `pytest.approx(abs=1e-6)`, accuracies exactly (as fractions).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from psamf.metrics import (
    REGRESSION_KEYS,
    SIMS_KEYS,
    compute_metrics,
    format_table,
    regression_metrics,
    sims_metrics,
    summarize_seeds,
    trivial_baselines,
)

A = dict(abs=1e-6)


# --------------------------------------------------------------------------------------------
# MOSI / MOSEI (§8.1)
# --------------------------------------------------------------------------------------------


def test_regression_hand_computed_with_zero_labels_and_zero_prediction():
    #      idx:   0     1     2     3     4     5
    t = np.array([0.0, 0.0, 1.2, -0.6, 2.5, -3.4])
    p = np.array([0.0, -0.2, 1.6, 0.0, 3.5, -2.6])
    m = regression_metrics(p, t)

    assert set(REGRESSION_KEYS) | {"n", "n_non0"} == set(m)
    assert m["n"] == 6
    # Has0: t>=0 = [T,T,T,F,T,F]; p>=0 = [T,F,T,T,T,F] (p=0.0 at idx3 counts as non-negative)
    # matches: idx0 y, idx1 n, idx2 y, idx3 n, idx4 y, idx5 y -> 4/6
    assert m["acc2_has0"] == pytest.approx(4 / 6)
    # Has0 weighted F1, true = t>=0:
    #   class T: tp=3 (0,2,4), fp=1 (3), fn=1 (1) -> F1 = 6/(6+1+1) = 0.75, support 4
    #   class F: tp=1 (5), fp=1 (1), fn=1 (3)     -> F1 = 2/(2+1+1) = 0.5,  support 2
    #   weighted = (4*0.75 + 2*0.5)/6 = 4/6
    assert m["f1_has0"] == pytest.approx(4 / 6)
    # Non0: keep t != 0 -> idx 2,3,4,5; t>0 = [T,F,T,F]; p>0 = [T,F,T,F] (p=0.0 at idx3 counts as negative)
    # -> 4/4, F1 = 1. Has0 and Non0 differ here because of the zero labels and the exact-zero prediction.
    assert m["n_non0"] == 4
    assert m["acc2_non0"] == 1.0
    assert m["f1_non0"] == pytest.approx(1.0)
    # Acc-7: clip ±3 -> t [0,0,1.2,-0.6,2.5,-3], p [0,-0.2,1.6,0,3,-2.6]
    #   round (half even) -> t [0,0,1,-1,2,-3], p [0,-0,2,0,3,-3]
    #   matches idx0, idx1 (-0 == 0), idx5 -> 3/6
    assert m["acc7"] == pytest.approx(3 / 6)
    # Acc-5: clip ±2 -> t [0,0,1.2,-0.6,2,-2], p [0,-0.2,1.6,0,2,-2]
    #   round -> t [0,0,1,-1,2,-2], p [0,0,2,0,2,-2]; matches idx0,1,4,5 -> 4/6
    assert m["acc5"] == pytest.approx(4 / 6)
    # MAE unclipped: |p-t| = [0, .2, .4, .6, 1.0, .8], sum 3.0 -> 0.5  (clipped at ±3 would give 2.1/6 = 0.35)
    assert m["mae"] == pytest.approx(0.5, **A)


def test_acc7_acc5_round_half_to_even():
    # np.round: 0.5->0, 1.5->2, -0.5->-0, 2.5->2, -1.5->-2, -2.5->-2 (half away from zero would give 1,2,-1,3,-2,-3)
    p = np.array([0.5, 1.5, -0.5, 2.5, -1.5, -2.5])
    t = np.array([0.0, 2.0, 0.0, 2.0, -2.0, -2.0])
    m = regression_metrics(p, t)
    assert m["acc7"] == 1.0  # all six match; half-away-from-zero would match only idx1, idx4 -> 2/6
    # Acc-5: clip ±2 first: p -> [.5,1.5,-.5,2,-1.5,-2] -> round [0,2,-0,2,-2,-2] = t -> 6/6
    assert m["acc5"] == 1.0


def test_acc7_acc5_clip_and_mae_unclipped():
    #      idx:   0     1     2     3     4
    p = np.array([5.0, -4.0, 2.6, -2.6, 2.6])
    t = np.array([3.0, -3.0, 3.0, -3.0, 2.0])
    m = regression_metrics(p, t)
    # Acc-7: clip ±3 -> p [3,-3,2.6,-2.6,2.6] -> round [3,-3,3,-3,3]; t round [3,-3,3,-3,2]
    #   matches idx0..3 -> 4/5 (without clipping round(5)=5, round(-4)=-4 would miss idx0, idx1 -> 2/5)
    assert m["acc7"] == pytest.approx(4 / 5)
    # Acc-5: clip ±2 -> p [2,-2,2,-2,2], t [2,-2,2,-2,2] -> 5/5 (idx4 differs in Acc-7, agrees in Acc-5)
    assert m["acc5"] == 1.0
    # MAE unclipped: |5-3| + |-4+3| + |2.6-3| + |-2.6+3| + |2.6-2| = 2 + 1 + .4 + .4 + .6 = 4.4 -> 0.88
    # (clipped at ±3 would be (0+0+.4+.4+.6)/5 = 0.28)
    assert m["mae"] == pytest.approx(0.88, **A)


def test_weighted_f1_argument_order_true_then_pred():
    from sklearn.metrics import f1_score

    # Has0 and Non0 coincide here (no zero labels or predictions).
    t = np.array([1.0, 2.0, 0.5, 3.0, -1.0])  # >=0 / >0: [T,T,T,T,F]
    p = np.array([0.5, 1.5, -0.5, -2.0, -1.0])  # >=0 / >0: [T,T,F,F,F]
    # Per class (true = t):
    #   class T: tp=2, fp=0, fn=2 -> F1 = 4/(4+0+2) = 2/3; support in t = 4, in p = 2
    #   class F: tp=1, fp=2, fn=0 -> F1 = 2/(2+2+0) = 1/2; support in t = 1, in p = 3
    # f1_score(true, pred, weighted) = (4*2/3 + 1*1/2)/5 = (16/6 + 3/6)/5 = 19/30 = 0.6333...
    # f1_score(pred, true, weighted) = (2*2/3 + 3*1/2)/5 = (8/6 + 9/6)/5 = 17/30 = 0.5666...
    right, wrong = 19 / 30, 17 / 30
    # the case discriminates: sklearn itself gives the two different numbers
    assert f1_score(t >= 0, p >= 0, average="weighted") == pytest.approx(right)
    assert f1_score(p >= 0, t >= 0, average="weighted") == pytest.approx(wrong)
    m = regression_metrics(p, t)
    assert m["f1_has0"] == pytest.approx(right)
    assert m["f1_non0"] == pytest.approx(right)
    assert m["acc2_has0"] == pytest.approx(3 / 5)  # idx 0,1,4 agree


def test_corr_hand_computed_and_unclipped():
    # p=[1,2,3,4], t=[1,3,2,4]: means 2.5; dp=[-1.5,-.5,.5,1.5], dt=[-1.5,.5,-.5,1.5]
    # sum dp*dt = 2.25 - .25 - .25 + 2.25 = 4; sum dp^2 = sum dt^2 = 5 -> r = 4/5
    assert regression_metrics([1, 2, 3, 4], [1, 3, 2, 4])["corr"] == pytest.approx(0.8, **A)
    # p=[0,1,2,6], t=[0,1,2,3]: mean p 2.25, dp=[-2.25,-1.25,-.25,3.75]; mean t 1.5, dt=[-1.5,-.5,.5,1.5]
    # sum dp*dt = 3.375 + .625 - .125 + 5.625 = 9.5; sum dp^2 = 5.0625+1.5625+.0625+14.0625 = 20.75; sum dt^2 = 5
    # r = 9.5/sqrt(103.75) = 0.93267...; clipping p at 3 would give [0,1,2,3] and r = 1
    m = regression_metrics([0, 1, 2, 6], [0, 1, 2, 3])
    assert m["corr"] == pytest.approx(9.5 / math.sqrt(103.75), **A)
    assert m["corr"] < 0.99


def test_constant_inputs_give_nan_corr_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from corrcoef, no sklearn UndefinedMetricWarning
        m = regression_metrics([0.7, 0.7, 0.7, 0.7], [1.0, -2.0, 0.5, 3.0])
        assert math.isnan(m["corr"])
        # all p >= 0; t>=0 = [T,F,T,T] -> 3/4
        assert m["acc2_has0"] == pytest.approx(3 / 4)
        assert math.isnan(regression_metrics([1.0, -1.0, 2.0], [2.0, 2.0, 2.0])["corr"])  # constant label
        assert math.isnan(regression_metrics([1.0], [2.0])["corr"])  # n = 1


def test_all_zero_labels_non0_is_nan_not_a_crash():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = regression_metrics([0.5, -0.5, 0.0], [0.0, 0.0, 0.0])
    assert m["n_non0"] == 0
    assert math.isnan(m["acc2_non0"]) and math.isnan(m["f1_non0"])
    # Has0: t>=0 all T; p>=0 = [T,F,T] -> 2/3
    assert m["acc2_has0"] == pytest.approx(2 / 3)


def test_inputs_any_shape_numpy_torch_bf16():
    torch = pytest.importorskip("torch")
    # values exact in bf16 and float32
    p = [0.5, -1.5, 2.0, 0.0]
    t = [1.0, -2.0, 2.0, 0.0]
    # Acc-7: round p [0,-2,2,0], t [1,-2,2,0] -> 3/4; MAE (.5 + .5 + 0 + 0)/4 = 0.25
    for pred, label in [
        (np.array(p).reshape(2, 2), np.array(t)),
        (torch.tensor(p).reshape(-1, 1), torch.tensor(t)),
        (torch.tensor(p, dtype=torch.bfloat16).reshape(4, 1, 1), np.array(t, dtype=np.float64)),
        (torch.tensor(p, dtype=torch.float64, requires_grad=True), t),
    ]:
        m = regression_metrics(pred, label)
        assert m["acc7"] == pytest.approx(3 / 4)
        assert m["mae"] == pytest.approx(0.25)
        assert m["n"] == 4


def test_validation_errors_name_the_input():
    with pytest.raises(ValueError, match=r"pred has 3 values but label has 2"):
        regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        regression_metrics([], [])
    with pytest.raises(ValueError, match=r"pred has 2 non-finite value\(s\) out of 4 \(1 NaN, 1 inf"):
        regression_metrics([1.0, np.nan, np.inf, 0.0], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"label has 1 non-finite"):
        sims_metrics([0.1, 0.2], [0.1, -np.inf])
    with pytest.raises(ValueError, match=r"label has 1 non-finite.*float32"):
        regression_metrics([1.0, 2.0], [1.0, 1e300])  # finite float64, inf after the float32 cast


# --------------------------------------------------------------------------------------------
# SIMS (§8.2)
# --------------------------------------------------------------------------------------------


def test_sims_bins_edges_clip_f1():
    #      idx:   0     1     2          3            4     5
    t = np.array([0.0, 0.1, 0.1000001, -0.1, 1.5, -0.7])
    p = np.array([0.05, 0.1, 0.1, -0.0999999, 1.0, -0.8])
    m = sims_metrics(p, t)
    assert set(SIMS_KEYS) | {"n"} == set(m)
    # clip both to [-1,1]: t[4] 1.5 -> 1.0; everything else unchanged
    # Acc-2 bins {[-1,0] -> 0, (0,1] -> 1}: t [0,1,1,0,1,0] (t=0 is negative), p [1,1,1,0,1,0]
    #   -> idx0 differs -> 5/6
    assert m["acc2"] == pytest.approx(5 / 6)
    # Acc-3 {(-1.01,-.1] 0, (-.1,.1] 1, (.1,1.01] 2}:
    #   t [1, 1 (0.1 is on the edge: neutral), 2 (0.1000001), 0 (-0.1), 2, 0]
    #   p [1, 1, 1, 1 (-0.0999999 > -0.1), 2, 0] -> idx2, idx3 differ -> 4/6
    assert m["acc3"] == pytest.approx(4 / 6)
    # Acc-5 {(-1.01,-.7] 0, (-.7,-.1] 1, (-.1,.1] 2, (.1,.7] 3, (.7,1.01] 4}:
    #   t [2, 2, 3, 1, 4, 0 (-0.7 on the edge)], p [2, 2, 2, 2, 4, 0] -> idx2, idx3 differ -> 4/6
    assert m["acc5"] == pytest.approx(4 / 6)
    # F1 on the Acc-2 bins, true = t: class 1: tp=3, fp=1, fn=0 -> 6/7 (support 3)
    #   class 0: tp=2, fp=0, fn=1 -> 4/5 (support 3); weighted = (6/7 + 4/5)/2 = 29/35
    #   (swapped order: supports 4 and 2 -> (4*6/7 + 2*4/5)/6 = 176/210)
    assert m["f1"] == pytest.approx(29 / 35)
    # MAE on clipped values: .05 + 0 + 1e-7 + 1e-7 + 0 (|1-1|, unclipped would be .5) + .1 = .1500002 -> /6
    assert m["mae"] == pytest.approx(0.1500002 / 6, **A)


def test_sims_float32_edge_matches_mmsa():
    # MMSA compares float32 values with float32 edges: float32(0.1) is exactly on the (-0.1, 0.1] upper edge,
    # so a label 0.1 given as float64 or float32 is neutral (class 1) and agrees with a prediction of 0.0.
    for dtype in (np.float64, np.float32):
        m = sims_metrics(np.array([0.0], dtype=dtype), np.array([0.1], dtype=dtype))
        assert m["acc3"] == 1.0  # both neutral
        m = sims_metrics(np.array([0.0], dtype=dtype), np.array([0.1000001], dtype=dtype))
        assert m["acc3"] == 0.0  # label positive, prediction neutral


def test_sims_mae_corr_on_clipped_values():
    # t clipped to [-1,1] equals p exactly -> MAE 0, Corr 1 (unclipped: MAE |3-1|/4 = 0.5, Corr < 1)
    p = [-1.0, 0.0, 0.5, 1.0]
    t = [-1.0, 0.0, 0.5, 3.0]
    m = sims_metrics(p, t)
    assert m["mae"] == 0.0
    assert m["corr"] == pytest.approx(1.0, **A)
    assert m["acc2"] == m["acc3"] == m["acc5"] == 1.0


def test_compute_metrics_dispatch():
    p, t = [0.2, -0.4, 0.9], [0.3, -0.5, 1.0]
    for name in ("mosi", "MOSEI", "custom"):
        assert set(REGRESSION_KEYS) <= set(compute_metrics(p, t, name))
    for name in ("sims", "simsv2"):
        assert set(compute_metrics(p, t, name)) == set(SIMS_KEYS) | {"n"}
    with pytest.raises(ValueError, match="unknown dataset"):
        compute_metrics(p, t, "iemocap")


# --------------------------------------------------------------------------------------------
# Seeds, table, baselines
# --------------------------------------------------------------------------------------------


def test_summarize_seeds_population_std():
    runs = [{"acc7": 1.0, "mae": 2.0}, {"acc7": 3.0, "mae": 2.0}, {"acc7": 5.0, "mae": 2.0}]
    s = summarize_seeds(runs)
    # acc7: mean 3; deviations -2, 0, 2; population var = (4+0+4)/3 = 8/3 -> std sqrt(8/3) = 1.63299
    # (sample std, ddof=1, would be sqrt(8/2) = 2)
    assert s["acc7"][0] == pytest.approx(3.0)
    assert s["acc7"][1] == pytest.approx(math.sqrt(8 / 3))
    assert s["mae"] == (pytest.approx(2.0), pytest.approx(0.0))
    # two seeds 0.8, 0.9: mean .85, population std .05 (sample std would be .0707)
    s2 = summarize_seeds([{"f1_non0": 0.8}, {"f1_non0": 0.9}])
    assert s2["f1_non0"] == (pytest.approx(0.85), pytest.approx(0.05))
    with pytest.raises(ValueError, match="at least one"):
        summarize_seeds([])
    with pytest.raises(ValueError, match=r"missing \['mae'\]"):
        summarize_seeds([{"acc7": 1.0, "mae": 1.0}, {"acc7": 1.0}])


def test_format_table_units():
    runs = [{"acc2_non0": 0.82, "mae": 0.70, "corr": 0.75, "n": 686},
            {"acc2_non0": 0.83, "mae": 0.72, "corr": 0.77, "n": 686}]
    text = format_table(runs)
    # acc: mean .825 -> 82.50 %, population std .005 -> 0.50; MAE mean .71, std .01 (not scaled); counts omitted
    assert "2 seed(s)" in text and "ddof=0" in text and "%" in text
    assert "82.50 ± 0.50 %" in text
    assert "0.7100 ± 0.0100" in text
    assert "0.7600 ± 0.0100" in text
    assert "686" not in text
    raw = format_table(summarize_seeds(runs), percent=False, keys=["acc2_non0"])
    assert "0.8250 ± 0.0050" in raw and "mae" not in raw
    with pytest.raises(KeyError):
        format_table(runs, keys=["acc9"])
    one = format_table(runs[:1])  # one seed: values, no "± 0.00" spread
    assert "1 seed, no spread" in one and "82.00 %" in one and "0.7000" in one and "±" not in one


def test_trivial_baselines_hand_computed():
    t = [-1.0, -0.6, 0.0, 0.0, 0.0, 2.0, 2.4, 2.6, 3.0]
    b = trivial_baselines(t)
    assert b["n"] == 9 and b["n_non0"] == 6
    # Has0: 2 negative, 7 non-negative -> 7/9
    assert b["acc2_has0"] == pytest.approx(7 / 9)
    # Non0: [-1,-.6,2,2.4,2.6,3]: 2 negative, 4 positive -> 4/6
    assert b["acc2_non0"] == pytest.approx(4 / 6)
    # Acc-7 classes: -1,-1,0,0,0,2,2,3,3 -> class 0 has 3 -> 3/9
    assert b["acc7"] == pytest.approx(3 / 9)
    # Acc-5 classes (clip ±2): -1,-1,0,0,0,2,2,2,2 -> class 2 has 4 -> 4/9
    assert b["acc5"] == pytest.approx(4 / 9)
    # predict 0: sum|t| = 1+.6+2+2.4+2.6+3 = 11.6 -> 11.6/9
    assert b["mae_zero"] == pytest.approx(11.6 / 9, **A)
    # predict mean: in fifteenths t = [-15,-9,0,0,0,30,36,39,45], sum 126 -> mean 14/15
    #   |t - mean| = [29,23,14,14,14,16,22,25,31]/15, sum 188/15 -> 188/135
    assert b["mae_mean"] == pytest.approx(188 / 135, **A)
    # median of 9 sorted values = 5th = 0 -> same as predicting 0
    assert b["mae_median"] == pytest.approx(11.6 / 9, **A)


def test_trivial_baselines_reproduce_mosi_test_floors():
    # docs/data-formats.md §8, MOSI test: 379 negative, 30 zero, 277 positive (n 686, Non0 n 656)
    t = np.array([-1.0] * 379 + [0.0] * 30 + [1.0] * 277)
    b = trivial_baselines(t)
    # Has0 majority = negative: 379/686 = 55.25 %; Non0 majority = negative: 379/656 = 57.77 %
    assert round(100 * b["acc2_has0"], 2) == 55.25
    assert round(100 * b["acc2_non0"], 2) == 57.77
    assert b["n_non0"] == 656


def test_trivial_baselines_sims():
    t = [-1.0, -0.5, 0.0, 0.0, 0.1, 0.5, 0.8, 1.2]
    b = trivial_baselines(t, dataset="sims")
    # clipped: [-1,-.5,0,0,.1,.5,.8,1]
    # Acc-2: [-1,0] has -1,-.5,0,0 = 4; (0,1] has 4 -> 4/8
    assert b["acc2"] == pytest.approx(4 / 8)
    # Acc-3: neg -1,-.5 (2); neutral 0,0,.1 (3); pos .5,.8,1 (3) -> 3/8
    assert b["acc3"] == pytest.approx(3 / 8)
    # Acc-5: (-1.01,-.7] 1; (-.7,-.1] 1; (-.1,.1] 3; (.1,.7] 1; (.7,1.01] 2 -> 3/8
    assert b["acc5"] == pytest.approx(3 / 8)
    # predict 0 on clipped: 1+.5+0+0+.1+.5+.8+1 = 3.9 -> 0.4875
    assert b["mae_zero"] == pytest.approx(0.4875, **A)
    # mean = (-1.5 + 2.4)/8 = .1125; |c-.1125| = 1.1125+.6125+.1125+.1125+.0125+.3875+.6875+.8875 = 3.925 -> .490625
    assert b["mae_mean"] == pytest.approx(0.490625, **A)
    # median = (0 + .1)/2 = .05; |c-.05| = 1.05+.55+.05+.05+.05+.45+.75+.95 = 3.9 -> .4875
    assert b["mae_median"] == pytest.approx(0.4875, **A)


# --------------------------------------------------------------------------------------------
# Cross-check against a transcription of MMSA's code (float32 numpy, as in metricsTop.py after cb5e0bd)
# --------------------------------------------------------------------------------------------


def _mmsa_mosei(y_pred, y_true):
    from sklearn.metrics import accuracy_score, f1_score

    test_preds, test_truth = y_pred.astype(np.float32), y_true.astype(np.float32)
    a7p, a7t = np.clip(test_preds, -3.0, 3.0), np.clip(test_truth, -3.0, 3.0)
    a5p, a5t = np.clip(test_preds, -2.0, 2.0), np.clip(test_truth, -2.0, 2.0)
    mae = np.mean(np.absolute(test_preds - test_truth)).astype(np.float64)
    corr = np.corrcoef(test_preds, test_truth)[0][1]
    mult_a7 = np.sum(np.round(a7p) == np.round(a7t)) / float(len(a7t))
    mult_a5 = np.sum(np.round(a5p) == np.round(a5t)) / float(len(a5t))
    non_zeros = np.array([i for i, e in enumerate(test_truth) if e != 0])
    nz_truth, nz_preds = test_truth[non_zeros] > 0, test_preds[non_zeros] > 0
    return {"acc2_has0": accuracy_score(test_preds >= 0, test_truth >= 0),
            "f1_has0": f1_score(test_truth >= 0, test_preds >= 0, average="weighted"),
            "acc2_non0": accuracy_score(nz_preds, nz_truth),
            "f1_non0": f1_score(nz_truth, nz_preds, average="weighted"),
            "acc7": mult_a7, "acc5": mult_a5, "mae": mae, "corr": corr}


def _mmsa_sims(y_pred, y_true):
    from sklearn.metrics import f1_score

    test_preds = np.clip(y_pred.astype(np.float32), -1.0, 1.0)
    test_truth = np.clip(y_true.astype(np.float32), -1.0, 1.0)
    out = {}
    for name, ms in (("acc2", [-1.01, 0.0, 1.01]), ("acc3", [-1.01, -0.1, 0.1, 1.01]),
                     ("acc5", [-1.01, -0.7, -0.1, 0.1, 0.7, 1.01])):
        bp, bt = test_preds.copy(), test_truth.copy()
        for i in range(len(ms) - 1):
            bp[np.logical_and(test_preds > ms[i], test_preds <= ms[i + 1])] = i
            bt[np.logical_and(test_truth > ms[i], test_truth <= ms[i + 1])] = i
        out[name] = np.sum(bp == bt) / float(len(bt))
        if name == "acc2":
            out["f1"] = f1_score(bt, bp, average="weighted")
    out["mae"] = np.mean(np.absolute(test_preds - test_truth)).astype(np.float64)
    out["corr"] = np.corrcoef(test_preds, test_truth)[0][1]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_mmsa_transcription_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = 400
    # labels on MOSI's 1/3 grid incl. zeros and ties, predictions with exact zeros, halves and out-of-range values
    t = np.round(rng.uniform(-3.5, 3.5, n) * 3) / 3
    t[:40] = 0.0
    p = rng.normal(0, 1.8, n)
    p[:20] = 0.0
    p[20:60] = rng.choice([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5], 40)
    ours, ref = regression_metrics(p, t), _mmsa_mosei(p, t)
    for k in REGRESSION_KEYS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-6), k
    ts = np.round(rng.uniform(-1.2, 1.2, n) * 10) / 10  # SIMS-like 0.1 grid, many values exactly on the edges
    ps = np.round(rng.uniform(-1.2, 1.2, n) * 20) / 20
    ours, ref = sims_metrics(ps, ts), _mmsa_sims(ps, ts)
    for k in SIMS_KEYS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-6), k


# ---------------------------------------------------------------------------------------- evaluation plots
def test_confusion_7class_counts_are_the_acc7_classes():
    from psamf.metrics import confusion_7class, regression_metrics

    rng = np.random.default_rng(0)
    label = rng.uniform(-3.2, 3.2, 200)
    pred = label + rng.normal(0, 0.8, 200)
    counts = confusion_7class(pred, label)
    assert counts.shape == (7, 7) and counts.sum() == 200
    assert np.trace(counts) / 200 == pytest.approx(regression_metrics(pred, label)["acc7"])
    assert counts[6].sum() == np.sum(np.round(np.clip(label, -3, 3)) == 3)  # row = label class
    # SIMS labels in [-1, 1] are scaled onto the same 7 classes: -1 -> -3, 1/3 -> 1, 1 -> 3
    sims = confusion_7class([-1.0, 0.34, 1.0], [-1.0, 0.34, 1.0], (-1.0, 1.0))
    assert [sims[i, i] for i in (0, 4, 6)] == [1, 1, 1]


def test_evaluation_plots_are_pngs_and_the_confusion_counts_sum_to_the_split(tmp_path):
    from psamf.evaluate import SplitEval, write_eval_plots

    rng = np.random.default_rng(1)
    res = {}
    for split, n in (("valid", 37), ("test", 53)):
        label = rng.uniform(-3, 3, n).astype(np.float32)
        res[split] = SplitEval(split, {"mae": 0.5, "acc7": 0.3}, [f"{split}{i}" for i in range(n)],
                               label + rng.normal(0, 0.5, n).astype(np.float32), label, "mosi")
    written = write_eval_plots(str(tmp_path / "plots"), res)
    assert len(written) == 6
    for split, r in res.items():
        for name in (f"{split}_confusion_7class.png", f"{split}_scatter.png"):
            assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = (tmp_path / "plots" / f"{split}_confusion_7class.csv").read_text().splitlines()
        assert rows[0] == "label/pred,-3,-2,-1,0,1,2,3" and len(rows) == 8
        assert sum(int(v) for row in rows[1:] for v in row.split(",")[1:]) == len(r.ids)
    assert not [p for p in (tmp_path / "plots").iterdir() if ".tmp" in p.name]  # atomic writes leave no temp files


def test_per_sample_class7_and_polarity_follow_the_metrics():
    """`psamf predict`'s per-sample labels: Acc-7's classes (clip, half-to-even) and the Non0 sign convention; on
    SIMS the seven classes of the [-1, 1] scale and the Acc-3 bins. Counting class7 agreement gives acc7."""
    from psamf.metrics import polarity, sentiment_class7

    p = np.array([-3.6, -2.5, -0.5, 0.0, 0.49, 1.5, 2.5, 9.0], np.float32)
    assert sentiment_class7(p, "mosi").tolist() == [-3, -2, 0, 0, 0, 2, 2, 3]
    assert polarity(p, "mosei").tolist() == ["negative"] * 3 + ["neutral"] + ["positive"] * 4
    s = np.array([-1.2, -0.5, -0.1, 0.1, 0.11, 0.17, 1.0], np.float32)
    assert sentiment_class7(s, "sims").tolist() == [-3, -2, 0, 0, 0, 1, 3]
    assert polarity(s, "simsv2").tolist() == ["negative", "negative", "negative", "neutral", "positive",
                                              "positive", "positive"]
    rng = np.random.default_rng(0)
    pred, label = rng.uniform(-3.5, 3.5, 200), np.round(rng.uniform(-3, 3, 200) * 3) / 3
    agree = np.mean(sentiment_class7(pred, "mosi") == sentiment_class7(label, "mosi"))
    assert agree == pytest.approx(regression_metrics(pred, label)["acc7"])
    with pytest.raises(ValueError, match="unknown dataset"):
        polarity(p, "iemocap")
