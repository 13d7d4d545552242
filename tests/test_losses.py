"""Each loss term against a hand computation on tiny tensors."""

import math

import pytest
import torch

from psamf.config import LossConfig, ModelConfig
from psamf.losses import clip_loss, compute_losses
from psamf.model import ClipPair, PSAMFOutput


def _ce(row, target):
    """-log softmax(row)[target], by hand."""
    return -(row[target] - math.log(sum(math.exp(v) for v in row)))


def test_clip_loss_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    s = 2.0
    # logits = s * x @ y.T = [[1.2, 2.0], [1.6, 0.0]]
    rows = [[1.2, 2.0], [1.6, 0.0]]
    cols = [[1.2, 1.6], [2.0, 0.0]]
    expected_rows = [_ce(rows[0], 0), _ce(rows[1], 1)]
    expected_cols = [_ce(cols[0], 0), _ce(cols[1], 1)]
    per_sample = [0.5 * (r + c) for r, c in zip(expected_rows, expected_cols)]
    got = clip_loss(ClipPair(x, y, torch.tensor(s)), reduction="none")
    assert got.tolist() == pytest.approx(per_sample, abs=1e-6)
    assert clip_loss(ClipPair(x, y, torch.tensor(s))).item() == pytest.approx(sum(per_sample) / 2, abs=1e-6)


def _output(with_personality=True, with_ps=True, with_clm=True):
    pred = torch.tensor([0.5, -1.0, 2.0])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    y = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    pair = ClipPair(x, y, torch.tensor(1.5))
    return PSAMFOutput(
        prediction=pred, hidden_states=(),
        align_cos=torch.tensor([0.2, -0.4, 0.8]) if with_personality else None,
        ccl_pair=pair if with_personality else None,
        ps_pred=torch.tensor([1.0, 0.0, 1.0]) if with_ps else None,
        clm_pairs=(pair, ClipPair(y, x, torch.tensor(2.0))) if with_clm else (),
    ), pair


def _clip_by_hand(x, y, s):
    B = len(x)
    logits = [[s * sum(a * b for a, b in zip(x[i], y[j])) for j in range(B)] for i in range(B)]
    per = []
    for i in range(B):
        row = logits[i]
        col = [logits[j][i] for j in range(B)]
        per.append(0.5 * (_ce(row, i) + _ce(col, i)))
    return per


def test_reference_loss_terms_by_hand():
    out, pair = _output()
    label = torch.tensor([1.0, -1.5, 0.0])
    cfg = LossConfig(w_l1=1.0, w_ccl=1.0, w_ps=0.1, w_clm=0.09)
    terms = compute_losses(out, label, cfg, ModelConfig(sim_mode="batch_dissimilarity"))
    l1 = (abs(0.5 - 1.0) + abs(-1.0 + 1.5) + abs(2.0 - 0.0)) / 3  # 1.0
    d = (1 - (0.2 - 0.4 + 0.8) / 3) / 2  # (1 - 0.2) / 2 = 0.4
    clip_ccl = sum(_clip_by_hand(pair.x.tolist(), pair.y.tolist(), 1.5)) / 3
    ccl = d * clip_ccl
    ps = (1 - d) * (abs(1.0 - 1.0) + abs(0.0 + 1.5) + abs(1.0 - 0.0)) / 3  # 0.6 * 2.5/3
    clm = clip_ccl + sum(_clip_by_hand(pair.y.tolist(), pair.x.tolist(), 2.0)) / 3
    assert terms["l1"].item() == pytest.approx(l1, abs=1e-6)
    assert terms["ccl"].item() == pytest.approx(ccl, abs=1e-6)
    assert terms["ps"].item() == pytest.approx(ps, abs=1e-6)
    assert terms["clm"].item() == pytest.approx(clm, abs=1e-6)
    assert terms["total"].item() == pytest.approx(l1 + ccl + 0.1 * ps + 0.09 * clm, abs=1e-6)


def test_paper_per_sample_similarity_by_hand():
    out, pair = _output()
    label = torch.tensor([1.0, -1.5, 0.0])
    terms = compute_losses(out, label, LossConfig(1, 1, 1, 1), ModelConfig(sim_mode="per_sample_cosine"))
    cos = [0.2, -0.4, 0.8]
    per = _clip_by_hand(pair.x.tolist(), pair.y.tolist(), 1.5)
    ccl = sum(c * p for c, p in zip(cos, per)) / 3
    ps = ((1 - 0.2) * 0.0 + (1 + 0.4) * 1.5 + (1 - 0.8) * 1.0) / 3
    assert terms["ccl"].item() == pytest.approx(ccl, abs=1e-6)
    assert terms["ps"].item() == pytest.approx(ps, abs=1e-6)


def test_paper_preset_per_sample_dissimilarity_by_hand():
    out, pair = _output()
    label = torch.tensor([1.0, -1.5, 0.0])
    terms = compute_losses(out, label, LossConfig(1, 1, 1, 1), ModelConfig(sim_mode="per_sample_dissimilarity"))
    d = [(1 - 0.2) / 2, (1 + 0.4) / 2, (1 - 0.8) / 2]  # 0.4, 0.7, 0.1
    per = _clip_by_hand(pair.x.tolist(), pair.y.tolist(), 1.5)
    ccl = sum(w * p for w, p in zip(d, per)) / 3
    ps = ((1 - 0.4) * 0.0 + (1 - 0.7) * 1.5 + (1 - 0.1) * 1.0) / 3
    assert terms["ccl"].item() == pytest.approx(ccl, abs=1e-6)
    assert terms["ps"].item() == pytest.approx(ps, abs=1e-6)


@pytest.mark.parametrize("sim_mode, aligns", [("batch_dissimilarity", True), ("per_sample_dissimilarity", True),
                                              ("per_sample_cosine", False)])
def test_minimising_ccl_aligns_t_s_with_t_p_except_in_the_literal_cosine_form(sim_mode, aligns):
    """Gradient descent on L_ccl alone, over free T_s / T_p embeddings (B=16, 8-d, CLIP on the normalised
    vectors): the dissimilarity forms pull each pair together and lower the CLIP loss; the literal
    `cos * CLIP` pushes pairs apart and raises CLIP, the degenerate optimum seen on the paper preset."""
    g = torch.Generator().manual_seed(0)
    t_s = torch.randn(16, 8, generator=g).requires_grad_()
    t_p = torch.randn(16, 8, generator=g).requires_grad_()
    opt = torch.optim.Adam([t_s, t_p], lr=0.05)

    def step_terms():
        xs, xp = torch.nn.functional.normalize(t_s, dim=-1), torch.nn.functional.normalize(t_p, dim=-1)
        pair = ClipPair(xs, xp, torch.tensor(1 / 0.07))
        out = PSAMFOutput(prediction=torch.zeros(16), hidden_states=(), align_cos=(xs * xp).sum(-1),
                          ccl_pair=pair, ps_pred=None, clm_pairs=())
        return compute_losses(out, torch.zeros(16), LossConfig(w_l1=0, w_ccl=1, w_ps=0, w_clm=0),
                              ModelConfig(sim_mode=sim_mode)), out.align_cos.mean().item(), clip_loss(pair).item()

    _, cos0, clip0 = step_terms()
    for _ in range(200):
        terms, _, _ = step_terms()
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    _, cos1, clip1 = step_terms()
    # measured (seed 0): cos 0.06 -> 0.91 / 0.86 / -0.38, CLIP 8.15 -> 0.004 / 0.004 / 20.1
    if aligns:
        assert cos1 > cos0 + 0.5 and clip1 < 0.1 * clip0
    else:
        assert cos1 < cos0 - 0.3 and clip1 > 2 * clip0


def test_absent_terms_are_not_in_the_dict_and_ps_is_plain_without_personality():
    out, _ = _output(with_personality=False, with_clm=False)
    label = torch.tensor([1.0, -1.5, 0.0])
    terms = compute_losses(out, label, LossConfig(), ModelConfig())
    assert set(terms) == {"l1", "ps", "total"}
    assert terms["ps"].item() == pytest.approx((0.0 + 1.5 + 1.0) / 3, abs=1e-6)
    out, _ = _output(with_ps=False)
    assert "ps" not in compute_losses(out, label, LossConfig(), ModelConfig())


def test_label_shape_b1_is_accepted():
    out, _ = _output()
    a = compute_losses(out, torch.tensor([1.0, -1.5, 0.0]), LossConfig(), ModelConfig())
    b = compute_losses(out, torch.tensor([[1.0], [-1.5], [0.0]]), LossConfig(), ModelConfig())
    assert a["total"].item() == pytest.approx(b["total"].item())
