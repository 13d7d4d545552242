"""Big Five personality regression in plain PyTorch, no Ray: the engine of `psamf personality pretrain`.

PSA-MF's personality encoder is a BERT fine-tuned on Big Five data; this module holds everything one process
does for that fine-tuning, whatever launches it (`psamf.pretrain` wraps it in Ray Train):

    read_bigfive(uri)                       CSV / Parquet corpus -> {split: BigFiveData}, validated
    build_encoder(name)                     a BERT-family encoder (hub name, local path, or TINY_CONFIG)
    tokenize(texts, tokenizer, max_len)     fixed-length token arrays
    TraitRegressor(encoder)                 5 outputs from the CLS through one linear layer
    pretrain_step(model, batch, optimizer)  one MSE step
    predict_traits / cls_features           inference over token arrays, in batches
    fit_ridge / ridge_predict               the untrained encoder's baseline: ridge on its frozen CLS
    trait_metrics(pred, true)               per-trait MAE and Pearson r, and their means
    export_encoder(encoder, tokenizer, out) a Hugging Face directory `model.personality_model` accepts

Why a linear head on the CLS: PSA-MF reads the personality encoder's CLS (`last_hidden_state[:, 0]`) and
nothing else, so the fine-tuning objective must shape exactly that vector; the head is dropped at export.
"""

from __future__ import annotations

import os
import shutil
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from psamf.synth import BIGFIVE_TRAITS

__all__ = ["TRAITS", "TINY_CONFIG", "TOKEN_COLUMNS", "BigFiveData", "read_bigfive", "build_encoder",
           "default_tokenizer", "tokenize", "TraitRegressor", "pretrain_step", "predict_traits", "cls_features",
           "fit_ridge", "ridge_predict", "trait_metrics", "export_encoder", "METRICS_FILE"]

#: trait columns, in this order everywhere (the model's 5 outputs, the metrics); one list, kept in synth
TRAITS: tuple[str, ...] = BIGFIVE_TRAITS
#: model name meaning "the tiny preset's randomly initialised personality BERT" (what `psamf prepare` builds
#: for the tiny preset without --personality-model), tokenised with `psamf:tiny`
TINY_CONFIG = "psamf:tiny-config"
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
METRICS_FILE = "pretrain_metrics.json"
SPLITS = ("train", "valid", "test")
_HELD_OUT = {"valid": 10, "test": 10}  # percent of speakers per split when the corpus has no `split` column


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------


@dataclass
class BigFiveData:
    """One split: ids, transcripts, (N, 5) float32 trait scores in [0, 1] (columns TRAITS)."""

    ids: list[str]
    text: list[str]
    traits: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _read_table(uri: str, s3_endpoint: str | None) -> Any:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from psamf.storage import resolve

    st = resolve(uri, s3_endpoint)
    lower = uri.lower()
    try:
        if lower.endswith((".parquet", ".pq")):
            return pq.read_table(st.root, filesystem=st.fs)
        if lower.endswith((".csv", ".tsv")):
            opts = pcsv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else ",", newlines_in_values=True)
            with st.fs.open_input_stream(st.root) as f:
                return pcsv.read_csv(f, parse_options=opts,
                                     convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file") from None
    except Exception as e:  # pyarrow raises its own types for malformed files
        raise ValueError(f"{uri}: not a readable {'Parquet' if 'parq' in lower else 'CSV'} file ({e})") from None
    raise ValueError(f"{uri}: a Big Five corpus is a .csv, .tsv or .parquet file")


def _split_of(key: str) -> str:
    """Deterministic speaker-disjoint split for corpora without a `split` column (Essays, PANDORA)."""
    h = zlib.crc32(key.encode("utf-8")) % 100
    return "valid" if h < _HELD_OUT["valid"] else ("test" if h < _HELD_OUT["valid"] + _HELD_OUT["test"] else "train")


def read_bigfive(uri: str, *, s3_endpoint: str | None = None) -> dict[str, BigFiveData]:
    """Read and validate a Big Five corpus (local path or URI, CSV/TSV or Parquet).

    Columns: `text` and the five TRAITS (numbers in [0, 1]) are required; `id` (default: the row number),
    `speaker` and `split` (train/valid/test) are optional. Without `split`, speakers (else ids) are assigned
    to train/valid/test 80/10/10 by a hash, so clips of one speaker never straddle splits. Every problem is a
    ValueError naming the file, the column and the first offending row."""
    table = _read_table(uri, s3_endpoint)
    cols = set(table.column_names)
    missing = [c for c in ("text", *TRAITS) if c not in cols]
    if missing:
        raise ValueError(f"{uri}: missing column(s) {missing} (a Big Five corpus needs text and "
                         f"{', '.join(TRAITS)}; found {sorted(cols)})")
    n = table.num_rows
    ids = [str(v) for v in table.column("id").to_pylist()] if "id" in cols else [str(i) for i in range(n)]
    if len(set(ids)) != n:
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{uri}: column id: duplicate id {dup!r}")
    text = table.column("text").to_pylist()
    for i, t in enumerate(text):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{uri}: column text: row {ids[i]!r} has no text ({t!r})")
    traits = np.zeros((n, len(TRAITS)), np.float32)
    for j, name in enumerate(TRAITS):
        vals = table.column(name).to_pylist()
        for i, v in enumerate(vals):
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{uri}: column {name}: row {ids[i]!r} is not a number ({v!r})") from None
            if not (0.0 <= x <= 1.0):  # NaN fails too
                raise ValueError(f"{uri}: column {name}: row {ids[i]!r} is {v!r}; trait scores must be in [0, 1] "
                                 "(rescale e.g. 1-5 Likert scores to [0, 1] first)")
            traits[i, j] = x
    if "split" in cols:
        split = [str(s) for s in table.column("split").to_pylist()]
        bad = [s for s in split if s not in SPLITS]
        if bad:
            raise ValueError(f"{uri}: column split: {bad[0]!r} is not one of {list(SPLITS)}")
    else:
        keys = [str(s) for s in table.column("speaker").to_pylist()] if "speaker" in cols else ids
        split = [_split_of(k) for k in keys]
    out = {}
    for s in SPLITS:
        rows = [i for i, v in enumerate(split) if v == s]
        if len(rows) < 2:
            raise ValueError(f"{uri}: split {s!r} has {len(rows)} row(s); train, valid and test need at least 2 each")
        out[s] = BigFiveData([ids[i] for i in rows], [text[i] for i in rows], traits[rows])
    return out


# ---------------------------------------------------------------------------------------------
# Encoder, tokens, model
# ---------------------------------------------------------------------------------------------


def default_tokenizer(model: str) -> str:
    """The tokenizer that goes with `model` when none is given: psamf:tiny for TINY_CONFIG, else the model's own."""
    from psamf.tokenizers import TINY

    return TINY if model == TINY_CONFIG else model


def build_encoder(name: str) -> nn.Module:
    """A trainable BERT-family encoder: TINY_CONFIG (the tiny preset's seeded random personality BERT, exactly
    what `psamf prepare --preset tiny --personality-cls` uses), a local directory or a hub name (AutoModel)."""
    from transformers import AutoModel

    if name == TINY_CONFIG:
        from psamf.config import Config
        from psamf.model import load_personality_encoder

        enc = load_personality_encoder(Config.from_preset("tiny").model)
    else:
        try:
            enc = AutoModel.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise ValueError(f"--model {name!r} could not be loaded ({str(e).splitlines()[0]}); give a local "
                             f"directory with config.json and weights, a cached hub name, or {TINY_CONFIG}") from None
        if not hasattr(enc, "config") or not hasattr(enc.config, "hidden_size"):
            raise ValueError(f"--model {name!r} is not a BERT-family encoder (no config.hidden_size)")
    enc.requires_grad_(True)
    return enc.train()


def tokenize(texts: list[str], tokenizer: Any, max_len: int) -> dict[str, np.ndarray]:
    """Right-padded int64 arrays (N, max_len) of TOKEN_COLUMNS, [CLS] ... [SEP] truncated to max_len."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    out = {c: np.asarray(enc[c], dtype=np.int64) for c in TOKEN_COLUMNS if c in enc}
    out.setdefault("token_type_ids", np.zeros_like(out["input_ids"]))
    return out


class TraitRegressor(nn.Module):
    """encoder -> CLS (B, H) -> dropout -> Linear(H, 5): one score per trait (trained with MSE against [0, 1])."""

    def __init__(self, encoder: nn.Module, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, len(TRAITS))

    def cls(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state[:, 0]  # (B, H), what PSA-MF's prepare reads

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.head(self.dropout(self.cls(input_ids, attention_mask, token_type_ids)))  # (B, 5)


def _inputs(batch: Mapping[str, Any], device: torch.device) -> dict[str, Tensor]:
    return {c: torch.as_tensor(batch[c]).long().to(device) for c in TOKEN_COLUMNS if c in batch}


def pretrain_step(model: nn.Module, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer, *,
                  device: torch.device, grad_clip: float = 1.0) -> float:
    """One optimiser step of mean squared error over the five traits. Returns the batch loss."""
    model.train()
    pred = model(**_inputs(batch, device))
    loss = torch.nn.functional.mse_loss(pred.float(), torch.as_tensor(batch["traits"]).float().to(device))
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite personality pretraining loss {float(loss)}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return float(loss.detach())


def _batches(tokens: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    n = len(tokens["input_ids"])
    for lo in range(0, n, batch_size):
        yield {c: v[lo:lo + batch_size] for c, v in tokens.items()}


@torch.no_grad()
def predict_traits(model: TraitRegressor, tokens: Mapping[str, np.ndarray], *, batch_size: int = 64,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """(N, 5) float32 predictions in eval mode (dropout off)."""
    device = torch.device(device)
    was = model.training
    model.eval()
    try:
        out = [model(**_inputs(b, device)).float().cpu().numpy() for b in _batches(tokens, batch_size)]
    finally:
        model.train(was)
    return np.concatenate(out).astype(np.float32)


@torch.no_grad()
def cls_features(encoder: nn.Module, tokens: Mapping[str, np.ndarray], *, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """(N, H) float32 CLS of a frozen encoder in eval mode: the vector `psamf prepare` stores as personality_cls."""
    device = torch.device(device)
    was = encoder.training
    encoder.eval()
    try:
        out = [encoder(**_inputs(b, device)).last_hidden_state[:, 0].float().cpu().numpy()
               for b in _batches(tokens, batch_size)]
    finally:
        encoder.train(was)
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Baseline and metrics
# ---------------------------------------------------------------------------------------------


@dataclass
class Ridge:
    """A ridge regression on standardised features (closed form); alpha chosen on validation."""

    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray  # (H, 5)
    bias: np.ndarray  # (5,)
    alpha: float


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float, mean: np.ndarray, std: np.ndarray) -> Ridge:
    z = (x.astype(np.float64) - mean) / std
    ym = y.mean(axis=0)
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - ym))
    return Ridge(mean, std, w, ym, alpha)


def ridge_predict(model: Ridge, x: np.ndarray) -> np.ndarray:
    return (((x.astype(np.float64) - model.mean) / model.std) @ model.weight + model.bias).astype(np.float32)


def fit_ridge(x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray,
              alphas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)) -> Ridge:
    """Ridge from features to the five traits, fitted on train, alpha selected by validation MSE (the baseline
    gets the same validation-only selection as the fine-tuned model)."""
    mean = x_train.astype(np.float64).mean(axis=0)
    std = x_train.astype(np.float64).std(axis=0) + 1e-6
    fits = [_ridge(x_train, y_train.astype(np.float64), a, mean, std) for a in alphas]
    return min(fits, key=lambda r: float(np.mean((ridge_predict(r, x_valid) - y_valid) ** 2)))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64) - a.mean(), b.astype(np.float64) - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0  # a constant prediction correlates with nothing


def trait_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """{"mae": {trait: .}, "pearson_r": {trait: .}, "mean_mae": ., "mean_r": ., "n": N}."""
    mae = {t: float(np.mean(np.abs(pred[:, j].astype(np.float64) - true[:, j]))) for j, t in enumerate(TRAITS)}
    r = {t: _pearson(pred[:, j], true[:, j]) for j, t in enumerate(TRAITS)}
    return {"mae": mae, "pearson_r": r, "mean_mae": float(np.mean(list(mae.values()))),
            "mean_r": float(np.mean(list(r.values()))), "n": int(len(true))}


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def check_export_target(out: str, run: str | None) -> None:
    """`out` may be written by the pretraining run `run` (a URI): it is absent, empty, or that same run's earlier
    export (its METRICS_FILE names the run). Anything else, another run's encoder included, is refused."""
    import json

    out = os.path.abspath(out)
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return
    marker = os.path.join(out, METRICS_FILE)
    if not os.path.isdir(out) or not os.path.exists(marker):
        raise ValueError(f"--out {out}: exists and is not an earlier personality export; choose a new directory")
    try:
        with open(marker) as f:
            earlier = json.load(f).get("run")
    except (OSError, ValueError) as e:
        raise ValueError(f"--out {out}: {METRICS_FILE} unreadable ({e}); choose a new directory") from e
    if run is not None and earlier is not None and earlier != run:
        raise ValueError(f"--out {out}: holds the encoder of pretraining run {earlier}, not of {run}; choose a new "
                         "directory (or delete it) rather than replace another run's encoder")


def export_encoder(encoder: nn.Module, tokenizer: Any, out: str, metrics: Mapping[str, Any]) -> str:
    """Write `out` as a Hugging Face directory: the encoder's `save_pretrained` (no regression head), its config,
    the tokenizer, and METRICS_FILE. Built under a temporary sibling name and renamed into place, so `out` is
    never half-written; an existing `out` is replaced only when it is an earlier export (holds METRICS_FILE)."""
    from psamf.storage import json_safe

    import json

    out = os.path.abspath(out)
    check_export_target(out, metrics.get("run"))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, METRICS_FILE), "w") as f:
            json.dump(json_safe(dict(metrics)), f, indent=2, allow_nan=False)
        if os.path.exists(out):
            old = f"{tmp}.old"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
