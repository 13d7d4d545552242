"""Load checkpoints of the reference implementation (github.com/HensonXie/PSA-MF) into psamf.

The reference's own `save_model` writes the model's **state dict** (`torch.save(model.state_dict(), path)`), so
its checkpoint files load here as they are (`psamf convert REF.pt OUT_DIR` turns one into a psamf checkpoint
directory). A file saved from a `DataParallel` model has every key prefixed with `module.`; a file that wraps
the weights as `{"state_dict": ...}` (or `"model"`, `"model_state_dict"`) is unwrapped. Files are read with
`torch.load(weights_only=True)`: a pickled module (anything but tensors in plain containers) is refused.

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
`r_v`), BERT's constant `position_ids` buffer (saved by older transformers), the personality BERT when the
model runs on precomputed CLS_p.

Anything else of the checkpoint that maps to no parameter of the model is **unknown**: an error under `strict`
naming the keys (a checkpoint of another configuration would otherwise load half its weights silently), a
reported drop otherwise. A parameter of the model that the checkpoint lacks is reported under its reference name
(the name to look for in the file). A half-precision (fp16/bf16) state dict is upcast to float32 with a warning:
psamf's parameters are float32, and `load_state_dict` would otherwise cast silently.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from psamf.config import ConfigError

__all__ = ["ReferenceCheckpointError", "ConversionReport", "rename_reference_key", "reference_key",
           "read_reference_state_dict", "convert_reference_state_dict", "load_reference_checkpoint"]

log = logging.getLogger("psamf.compat")

_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^ss_text_enc\.bertmodel\.embeddings\."), "text_bert.embeddings."),
    (re.compile(r"^ss_text_enc\.bertmodel\.encoder\.layer\.(\d+)\."), r"text_bert.encoder.layer.\1."),
    (re.compile(r"^ss_text_enc\.bertmodel\.encoder\.layer2\.(\d+)\."), r"mm_layers.\1."),
    (re.compile(r"^ss_text_enc\.bertmodel\.encoder\.hus\.linear_v\.0\."), "token_v."),
    (re.compile(r"^ss_text_enc\.bertmodel\.encoder\.hus\.linear_a\.0\."), "token_a."),
    (re.compile(r"^ss_text_enc\.bertmodel\.encoder\.clip_(ta|tv)\."), r"clip_\1."),
    (re.compile(r"^p_text_enc\.bertmodel\."), "personality_enc."),
]

# the inverse of _RENAMES, for naming a missing psamf parameter as the reference file would
_INVERSE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^text_bert\.embeddings\."), "ss_text_enc.bertmodel.embeddings."),
    (re.compile(r"^text_bert\.encoder\.layer\.(\d+)\."), r"ss_text_enc.bertmodel.encoder.layer.\1."),
    (re.compile(r"^mm_layers\.(\d+)\."), r"ss_text_enc.bertmodel.encoder.layer2.\1."),
    (re.compile(r"^token_v\."), "ss_text_enc.bertmodel.encoder.hus.linear_v.0."),
    (re.compile(r"^token_a\."), "ss_text_enc.bertmodel.encoder.hus.linear_a.0."),
    (re.compile(r"^clip_(ta|tv)\."), r"ss_text_enc.bertmodel.encoder.clip_\1."),
    (re.compile(r"^personality_enc\."), "p_text_enc.bertmodel."),
]

_DROPS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^text_enc\."), "the reference's vanilla BERT copy: computed every step, output never used"),
    (re.compile(r"\.pooler\."), "BERT pooler: unused by PSA-MF"),
    (re.compile(r"^r_a\."), "r_a: defined but unused in the reference (both attentions query with r_v)"),
    (re.compile(r"\.embeddings\.position_ids$"), "BERT position_ids buffer: a constant the model rebuilds"),
]
_UNKNOWN = "unknown: maps to no parameter of this psamf configuration"
_NO_PERSONALITY = "personality BERT not built in this model (it runs on precomputed CLS_p)"
_HALF = (torch.float16, torch.bfloat16)
_WRAPPERS = ("state_dict", "model", "model_state_dict")


class ReferenceCheckpointError(ConfigError):
    """A reference checkpoint file is unreadable, or does not fit the model (exit status 2 in the CLI)."""


@dataclass
class ConversionReport:
    """What a conversion did, for the user to read (`summary`) and for tests to check."""

    loaded: list[str] = field(default_factory=list)  # psamf keys filled from the checkpoint
    dropped: dict[str, str] = field(default_factory=dict)  # reference key -> reason
    missing: list[str] = field(default_factory=list)  # reference names of psamf parameters the checkpoint lacks
    unknown: list[str] = field(default_factory=list)  # reference keys that map to nothing (also in `dropped`)
    upcast: list[str] = field(default_factory=list)  # reference keys read as fp16/bf16, loaded as float32

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for r in self.dropped.values():
            reasons[r] = reasons.get(r, 0) + 1
        lines = [f"loaded {len(self.loaded)} tensors; dropped {len(self.dropped)}; missing {len(self.missing)}"
                 + (f"; upcast to float32 {len(self.upcast)}" if self.upcast else "")]
        lines += [f"  dropped {n:4d}: {r}" for r, n in reasons.items()]
        lines += [f"  unknown: {k}" for k in self.unknown[:20]]
        lines += [f"  missing: {k}" + (f" (psamf {rename_reference_key(k)})" if rename_reference_key(k) != k else "")
                  for k in self.missing[:20]]
        return "\n".join(lines)


def rename_reference_key(key: str) -> str:
    """The psamf name of a reference state-dict key (unchanged where the names agree)."""
    for pattern, repl in _RENAMES:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def reference_key(key: str) -> str:
    """The reference name of a psamf state-dict key: the inverse of `rename_reference_key`."""
    for pattern, repl in _INVERSE:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def _drop_reason(key: str, new: str, target: Mapping[str, Tensor]) -> str | None:
    reason = next((r for p, r in _DROPS if p.search(key)), None)
    if reason is not None and key.startswith("r_a.") and new in target:
        return None  # model.separate_queries=true gives r_a a use: keep it
    if reason is None and new not in target:
        return _NO_PERSONALITY if new.startswith("personality_enc.") else _UNKNOWN
    return reason


def convert_reference_state_dict(ref: Mapping[str, Tensor], model: nn.Module, *, name: str = "state dict",
                                 ) -> tuple[dict[str, Tensor], ConversionReport]:
    """Rename a reference state dict for `model`. Shape mismatches are errors naming both shapes and `name` (the
    file); keys that map to nothing are reported (`report.unknown`), and `load_reference_checkpoint` decides
    whether that is fatal."""
    target = model.state_dict()
    report = ConversionReport()
    out: dict[str, Tensor] = {}
    mismatches = []
    half: set[str] = set()
    for key, value in ref.items():
        key = key[len("module."):] if key.startswith("module.") else key  # DataParallel prefix
        new = rename_reference_key(key)
        reason = _drop_reason(key, new, target)
        if reason is not None:
            report.dropped[key] = reason
            if reason == _UNKNOWN:
                report.unknown.append(key)
            continue
        if tuple(value.shape) != tuple(target[new].shape):
            mismatches.append(f"{key} -> {new}: checkpoint {tuple(value.shape)} vs model {tuple(target[new].shape)}")
            continue
        if value.dtype in _HALF:
            report.upcast.append(key)
            half.add(str(value.dtype).replace("torch.", ""))
            value = value.float()
        out[new] = value
        report.loaded.append(new)
    if mismatches:
        raise ReferenceCheckpointError(
            f"{name}: reference checkpoint does not fit this model configuration (check model.audio_dim, "
            "model.visual_dim, model.hidden_size, layers):\n  " + "\n  ".join(mismatches[:20]))
    report.missing = sorted(reference_key(k) for k in target if k not in out)
    if report.upcast:
        warnings.warn(f"reference checkpoint: {len(report.upcast)} half-precision ({', '.join(sorted(half))}) "
                      "tensors upcast to float32", UserWarning, stacklevel=2)
    return out, report


def _unwrap(obj: Any) -> Any:
    """The state dict inside a `{"state_dict": ...}` (or "model", "model_state_dict") wrapper, else `obj`."""
    if isinstance(obj, Mapping):
        for k in _WRAPPERS:
            if k in obj and isinstance(obj[k], Mapping):
                return obj[k]
    return obj


def _check_state_dict(ref: Any, name: str) -> Mapping[str, Tensor]:
    if not isinstance(ref, Mapping):
        raise ReferenceCheckpointError(f"{name}: expected a mapping of parameter names to tensors (a state_dict), "
                                       f"got {type(ref).__name__}")
    bad = [str(k) for k, v in ref.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ReferenceCheckpointError(f"{name}: expected a mapping of parameter names to tensors (a state_dict); "
                                       f"not a tensor: {', '.join(bad[:5])}")
    if not ref:
        raise ReferenceCheckpointError(f"{name}: the state_dict is empty")
    return ref


def read_reference_state_dict(source: str | Path, *, s3_endpoint: str | None = None) -> Mapping[str, Tensor]:
    """Read a reference checkpoint file (a local path or a URI such as `s3://...`) as a state dict.

    `torch.load(weights_only=True)`: tensors in plain containers only, nothing executed. Unwraps
    `{"state_dict": ...}`; the `module.` prefix is removed later, key by key. A truncated or corrupt file, or a
    pickled module, is a `ReferenceCheckpointError` naming the file."""
    from psamf.storage import read_bytes, resolve

    name = str(source)
    try:
        if "://" in name:
            st = resolve(name, s3_endpoint)
            data: Any = io.BytesIO(read_bytes(st.fs, st.root))
        else:
            data = name
        obj = torch.load(data, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ReferenceCheckpointError(f"{name}: no such file") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file; re-raised naming it
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ReferenceCheckpointError(
            f"{name}: not a loadable state dict, truncated or corrupt? ({e.__class__.__name__}: {first}). The "
            "reference's save_model writes torch.save(model.state_dict(), path); a file that pickles the whole "
            "model cannot be loaded safely (weights_only=True)") from None
    return _check_state_dict(_unwrap(obj), name)


def load_reference_checkpoint(model: nn.Module, source: str | Path | Mapping[str, Tensor], *,
                              strict: bool = True, s3_endpoint: str | None = None) -> ConversionReport:
    """Load a reference state dict (a path or URI of a `torch.save(state_dict)` file, or the dict) into `model`.

    strict: every psamf parameter must come from the checkpoint (the personality BERT excepted when the model has
    none), and every key of the checkpoint must map to a parameter or be one of the documented drops. Either
    failure is a `ReferenceCheckpointError` naming the keys (reference names) and the file."""
    if isinstance(source, (str, Path)):
        ref, name = read_reference_state_dict(source, s3_endpoint=s3_endpoint), str(source)
    else:
        ref, name = _check_state_dict(_unwrap(source), "state dict"), "state dict"
    converted, report = convert_reference_state_dict(ref, model, name=name)
    if strict and (report.unknown or report.missing):
        parts = []
        if report.unknown:
            parts.append(f"{len(report.unknown)} key(s) map to no parameter of this model (a checkpoint of another "
                         "configuration? check the preset and model.* overrides): " + ", ".join(report.unknown[:20]))
        if report.missing:
            parts.append(f"it lacks {len(report.missing)} parameter(s) this model needs: "
                         + ", ".join(report.missing[:20]))
        raise ReferenceCheckpointError(f"{name}: reference checkpoint does not match this model: "
                                       + "; ".join(parts))
    for k in report.unknown:
        log.warning("%s: dropped %s (maps to no parameter of this model)", name, k)
    model.load_state_dict(converted, strict=False)
    return report
