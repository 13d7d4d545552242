"""Load checkpoints of the reference implementation (github.com/HensonXie/PSA-MF) into psamf.

The reference model holds three BERT copies and keeps the pre-fusion modules inside its custom BERT
encoder. Its state-dict keys (tests/fixtures/reference-checkpoint-keys.tsv) map onto a `reference`-preset
`PSAMF` as follows; everything not listed keeps its name (the non-BERT modules use reference names).

    ss_text_enc.bertmodel.embeddings.*            -> text_bert.embeddings.*
    ss_text_enc.bertmodel.encoder.layer.{i}.*     -> text_bert.encoder.layer.{i}.*     (i < N)
    ss_text_enc.bertmodel.encoder.layer2.{j}.*    -> mm_layers.{j}.*
    ss_text_enc.bertmodel.encoder.hus.linear_v.0.* -> token_v.*
    ss_text_enc.bertmodel.encoder.hus.linear_a.0.* -> token_a.*
    ss_text_enc.bertmodel.encoder.clip_t{a,v}.*   -> clip_t{a,v}.*
    p_text_enc.bertmodel.*                        -> personality_enc.*

Dropped, each with its reason in the report: the vanilla BERT `text_enc.*` (computed every step,
never used), the three poolers (unused), `r_a` (defined, never used: both attentions query with
`r_v`), the personality BERT when the model runs on precomputed CLS_p.

Export the state dict in the reference environment with `torch.save(model.state_dict(), path)`:
the reference's own `torch.save(model, ...)` pickles its classes, which cannot be loaded safely here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^ss_text_enc\.bertmodel\.embeddings\."), "text_bert.embeddings."),
    (re.compile(r"^ss_text_enc\.bertmodel\.encoder\.layer\.(\d+)\."), r"text_bert.encoder.layer.\1."),
    (re.compile(r"^ss_text_enc\.bertmodel\.encoder\.layer2\.(\d+)\."), r"mm_layers.\1."),
    (re.compile(r"^ss_text_enc\.bertmodel\.encoder\.hus\.linear_v\.0\."), "token_v."),
    (re.compile(r"^ss_text_enc\.bertmodel\.encoder\.hus\.linear_a\.0\."), "token_a."),
    (re.compile(r"^ss_text_enc\.bertmodel\.encoder\.clip_(ta|tv)\."), r"clip_\1."),
    (re.compile(r"^p_text_enc\.bertmodel\."), "personality_enc."),
]

_DROPS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^text_enc\."), "the reference's vanilla BERT copy: computed every step, output never used"),
    (re.compile(r"\.pooler\."), "BERT pooler: unused by PSA-MF"),
    (re.compile(r"^r_a\."), "r_a: defined but unused in the reference (both attentions query with r_v)"),
]


@dataclass
class ConversionReport:
    loaded: list[str] = field(default_factory=list)  # psamf keys filled from the checkpoint
    dropped: dict[str, str] = field(default_factory=dict)  # reference key -> reason
    missing: list[str] = field(default_factory=list)  # psamf keys the checkpoint did not provide

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for r in self.dropped.values():
            reasons[r] = reasons.get(r, 0) + 1
        lines = [f"loaded {len(self.loaded)} tensors; dropped {len(self.dropped)}; missing {len(self.missing)}"]
        lines += [f"  dropped {n:4d}: {r}" for r, n in reasons.items()]
        lines += [f"  missing: {k}" for k in self.missing[:20]]
        return "\n".join(lines)


def rename_reference_key(key: str) -> str:
    for pattern, repl in _RENAMES:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def convert_reference_state_dict(ref: Mapping[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], ConversionReport]:
    """Rename a reference state dict for `model`; shape mismatches are errors naming both shapes."""
    target = model.state_dict()
    report = ConversionReport()
    out: dict[str, Tensor] = {}
    mismatches = []
    for key, value in ref.items():
        key = key[len("module."):] if key.startswith("module.") else key  # DataParallel prefix
        new = rename_reference_key(key)
        reason = next((r for p, r in _DROPS if p.search(key)), None)
        if reason is not None and key.startswith("r_a.") and new in target:
            reason = None  # model.separate_queries=true gives r_a a use: keep it
        if reason is None and new not in target:
            if new.startswith("personality_enc."):
                reason = "personality BERT not built in this model (it runs on precomputed CLS_p)"
            else:
                reason = "no counterpart in this psamf configuration"
        if reason is not None:
            report.dropped[key] = reason
            continue
        if tuple(value.shape) != tuple(target[new].shape):
            mismatches.append(f"{key} -> {new}: checkpoint {tuple(value.shape)} vs model {tuple(target[new].shape)}")
            continue
        out[new] = value
        report.loaded.append(new)
    if mismatches:
        raise ValueError("reference checkpoint does not fit this model configuration (check model.audio_dim, "
                         "model.visual_dim, model.hidden_size, layers):\n  " + "\n  ".join(mismatches[:20]))
    report.missing = sorted(k for k in target if k not in out)
    return out, report


def load_reference_checkpoint(model: nn.Module, source: str | Path | Mapping[str, Tensor], *,
                              strict: bool = True) -> ConversionReport:
    """Load a reference state dict (a path to a `torch.save(state_dict)` file, or the dict) into `model`.

    strict: every psamf parameter must come from the checkpoint (the personality BERT excepted
    when the model has none)."""
    if isinstance(source, (str, Path)):
        try:
            ref = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name and the fix
            raise ValueError(f"{source}: not a loadable state dict ({e.__class__.__name__}: {e}). Export it in the "
                             "reference environment with torch.save(model.state_dict(), path).") from None
        for k in ("state_dict", "model", "model_state_dict"):
            if isinstance(ref, Mapping) and k in ref and isinstance(ref[k], Mapping):
                ref = ref[k]
                break
    else:
        ref = source
    if not isinstance(ref, Mapping) or not all(isinstance(v, Tensor) for v in ref.values()):
        raise ValueError(f"{source if isinstance(source, (str, Path)) else 'state dict'}: expected a mapping of "
                         "parameter names to tensors")
    converted, report = convert_reference_state_dict(ref, model)
    if strict and report.missing:
        raise ValueError("reference checkpoint lacks parameters this model needs: " + ", ".join(report.missing[:20]))
    model.load_state_dict(converted, strict=False)
    return report
