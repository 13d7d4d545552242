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

import torch
import torch.nn.functional as F
from torch import Tensor

from psamf.config import LossConfig, ModelConfig
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
