"""PSA-MF losses as named terms.

    total = w_l1 * l1 + w_ccl * ccl + w_ps * ps + w_clm * clm

l1   task loss, mean |y_hat - y|
ccl  composite contrastive loss: sim * CLIP(T_s, T_p)
ps   personalised sentiment constraint: (1 - sim) * |W_y T_s' - y|
clm  cross-modal contrastive loss: CLIP(CLS_s, a_tok) + CLIP(CLS_s, v_tok)

"sim" (model.sim_mode):
  batch_dissimilarity  reference code: d = (1 - mean_batch cos(T_s, T_p)) / 2, one scalar per batch;
                       ccl = d * CLIP, ps = (1 - d) * mean L1  (docs/paper-vs-code.md §3)
  per_sample_dissimilarity   (paper preset) the paper's per-sample weighting in the code's direction:
                       d_i = (1 - cos(T_s^i, T_p^i)) / 2 in [0, 1]; ccl = mean_i d_i * CLIP_i,
                       ps = mean_i (1 - d_i) * |W_y T_s^i - y_i|
  per_sample_cosine    the paper's text read literally: sim_i = cos(T_s^i, T_p^i); ccl = mean_i sim_i * CLIP_i,
                       ps = mean_i (1 - sim_i) * |W_y T_s^i - y_i|. Degenerate: sim_i * CLIP_i is lowest when
                       cos -> -1 and CLIP is large, so training anti-aligns T_s and T_p and *raises* the
                       contrastive loss (on an H200 the paper preset reached val ccl = -3.16 within 4 epochs;
                       tests/test_losses.py shows it in 200 steps). Kept for ablations, not as a default.
Without a personality encoder (ablation) there is no ccl and ps is the plain L1 constraint.
The loss functions hold no parameters: every projection lives in the model, so DDP sees it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from psamf.config import Config, LossConfig, ModelConfig
from psamf.model import ClipPair, PSAMFOutput


def clip_loss(pair: ClipPair, reduction: str = "mean") -> Tensor:
    """Symmetric InfoNCE over in-batch negatives: ½ [CE(s·x yᵀ, i) + CE(s·y xᵀ, i)]."""
    logits = pair.logit_scale * pair.x @ pair.y.t()  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)
    per_sample = 0.5 * (F.cross_entropy(logits, target, reduction="none")
                        + F.cross_entropy(logits.t(), target, reduction="none"))  # (B,)
    return per_sample.mean() if reduction == "mean" else per_sample


def compute_losses(out: PSAMFOutput, label: Tensor, loss_cfg: LossConfig, model_cfg: ModelConfig) -> dict[str, Tensor]:
    """Every active term (unweighted) plus `total` (weighted sum). Terms the model did not produce
    (ablations) are absent from the dict."""
    y = label.reshape(-1).to(out.prediction.dtype)  # (B,)
    terms: dict[str, Tensor] = {"l1": (out.prediction - y).abs().mean()}

    ps_weight: Tensor | float = 1.0
    if out.ccl_pair is not None:
        if model_cfg.sim_mode == "batch_dissimilarity":
            d = (1.0 - out.align_cos.mean()) / 2.0  # scalar in [0, 1]
            terms["ccl"] = d * clip_loss(out.ccl_pair)
            ps_weight = 1.0 - d
        else:
            cos = out.align_cos  # (B,)
            w = (1.0 - cos) / 2.0 if model_cfg.sim_mode == "per_sample_dissimilarity" else cos  # (B,)
            terms["ccl"] = (w * clip_loss(out.ccl_pair, reduction="none")).mean()
            ps_weight = 1.0 - w
    if out.ps_pred is not None:
        terms["ps"] = (ps_weight * (out.ps_pred - y).abs()).mean()
    if out.clm_pairs:
        terms["clm"] = sum(clip_loss(p) for p in out.clm_pairs)

    weights = {"l1": loss_cfg.w_l1, "ccl": loss_cfg.w_ccl, "ps": loss_cfg.w_ps, "clm": loss_cfg.w_clm}
    terms["total"] = sum(weights[k] * v for k, v in terms.items())
    return terms


# ---- chance levels: the value of each term when the model has learned nothing from the inputs ----------------

CHANCE_RTOL = 0.05  # a term is "at chance" in an epoch when |value - chance| <= CHANCE_RTOL x scale


def chance_levels(cfg: Config, train_constant_mae: float | None = None) -> dict[str, float]:
    """The value each training loss term takes when the model has learned nothing from the inputs.

    With B = optim.batch_size (the per-worker batch: each rank computes its losses on its own batch):
    * `clm` = CLIP(CLS_s, a) + CLIP(CLS_s, v), where `clip_loss` is the symmetric InfoNCE
      ½[CE(rows) + CE(columns)] over B in-batch candidates. With uninformative (equal) logits each cross-entropy
      is ln B, so each CLIP term is ln B and clm's chance level is **2·ln B** (the demo's stuck value).
    * `ccl` = w · CLIP(T_s, T_p), w = (1 - cos)/2 (dissimilarity modes) or w = cos (per_sample_cosine). For
      unaligned vectors (cos = 0) that is **ln B / 2**, resp. **0**. The weight is learned too, so this is a
      reference value: ccl can also fall by aligning T_s and T_p without the CLIP term learning anything.
    * `l1` = mean |ŷ - y|: chance is the best constant predictor's MAE on the train split (`train_constant_mae`,
      mean |y - median(y)|); `ps` = (1 - w)·|W_y T_s - y|: **(1 - w)** times that (w as above; 1 without the
      personality encoder). The two regression terms are left out when `train_constant_mae` is unknown.
    """
    m = cfg.model
    lnb = math.log(cfg.optim.batch_size)
    w0 = 0.0 if m.sim_mode == "per_sample_cosine" else 0.5
    out: dict[str, float] = {}
    if m.use_prefusion and m.use_clm_loss:
        out["clm"] = 2 * lnb
    if m.use_personality:
        out["ccl"] = w0 * lnb
    if train_constant_mae is not None:
        out["l1"] = float(train_constant_mae)
        if m.use_ps_loss:
            out["ps"] = (1 - w0 if m.use_personality else 1.0) * float(train_constant_mae)
    return out


def terms_at_chance(history: Sequence[Mapping[str, Any]], chance: Mapping[str, float], batch_size: int,
                    rtol: float = CHANCE_RTOL) -> dict[str, bool]:
    """For each term with a chance level: True when its train value (`train_<term>`) stayed within
    rtol x scale of chance in every epoch (scale = the chance value, or ln B where chance is 0)."""
    out: dict[str, bool] = {}
    for term, c in chance.items():
        vals = [float(r[f"train_{term}"]) for r in history if r.get(f"train_{term}") is not None]
        if not vals:
            continue
        scale = abs(c) if c != 0 else math.log(batch_size)
        out[term] = all(abs(v - c) <= rtol * scale for v in vals)
    return out
