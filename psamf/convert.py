"""Turn a checkpoint of the reference implementation into a psamf checkpoint directory (`psamf convert`).

    convert_reference_checkpoint(source, out_dir, cfg) -> ConversionReport

The reference's `save_model` writes a state dict; `psamf.compat` reads it (`module.` prefix, `{"state_dict": ...}`
wrapper, `weights_only=True`) and maps its keys onto a model built from `cfg` (normally the `reference` or
`reference-mosei` preset, with overrides where the checkpoint was trained with other dims). The result is written
by `psamf.checkpoint.write_inference_checkpoint`: the same files a training checkpoint holds for inference
(model.pt, config.yaml, meta.json with checksums), so `psamf evaluate OUT_DIR` and `load_model(OUT_DIR)` take it
as it is. Source and destination may be local paths or `s3://` URIs (one storage layer).
"""

from __future__ import annotations

from pathlib import Path

from psamf.checkpoint import check_new_checkpoint_dir, write_inference_checkpoint
from psamf.compat import ConversionReport, load_reference_checkpoint
from psamf.config import Config
from psamf.model import build_model

__all__ = ["convert_reference_checkpoint"]


def convert_reference_checkpoint(source: str | Path, out_dir: str, cfg: Config, *, strict: bool = True,
                                 s3_endpoint: str | None = None) -> ConversionReport:
    """Load the reference state dict at `source` into a model built from `cfg` and write it to `out_dir`.

    The model is built with its personality BERT (as `evaluate` and `load_model` build it), so the written
    model.pt loads strictly there. Every error (a non-empty `out_dir`, checked first, before the model is built;
    an unreadable file; unknown or missing keys under `strict`; shape mismatches) comes before anything is
    written."""
    check_new_checkpoint_dir(out_dir, s3_endpoint=s3_endpoint)
    model = build_model(cfg.model)
    report = load_reference_checkpoint(model, source, strict=strict, s3_endpoint=s3_endpoint)
    write_inference_checkpoint(out_dir, model, cfg, s3_endpoint=s3_endpoint, meta={
        "converted_from": str(source), "conversion": {
            "loaded": len(report.loaded), "dropped": len(report.dropped), "unknown": list(report.unknown),
            "missing": list(report.missing), "upcast": len(report.upcast)}})
    return report
