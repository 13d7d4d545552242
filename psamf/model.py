"""PSA-MF: Personality-Sentiment Aligned Multi-Level Fusion (arXiv 2512.01442), in one file.

Read top to bottom: audio/visual encoders -> CLIP heads -> cross-modal block -> the model
(personality encoder, sentiment BERT split into text + multimodal layers, alignment,
pre-fusion, cross-modal attention, enhanced fusion, head) -> builders.

Notation (shape comments):
    B    batch                      L    text tokens (trimmed to the batch's longest transcript)
    T_a  audio frames (batch max)   T_v  visual frames (batch max)
    D_a  audio features             D_v  visual features
    H    BERT width (768)           H_p  personality BERT width (768)
    A    audio/visual width after the LSTM (64)       P  alignment projection width (64)

Module names follow the reference implementation (github.com/HensonXie/PSA-MF, `src/model.py`,
`src/modules/encoders.py`) wherever a module exists there, so `psamf.compat` maps its checkpoints
with a short, explicit table. Every behaviour in which the reference code departs from the paper
is a `ModelConfig` switch (see docs/paper-vs-code.md §4); the `reference` preset
reproduces the code, the `paper` preset the text. The reference's third, unused BERT copy is not
built.

Inputs are batch-major: audio (B, T_a, D_a) and visual (B, T_v, D_v) with valid frames first
and true lengths; the LSTM and `nn.MultiheadAttention` tensors are time-major inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psamf.config import ConfigError, ModelConfig, OptimConfig

# The keyword inputs of PSAMF.forward; batches may carry more (label, sample_id, ...).
MODEL_INPUT_KEYS = (
    "input_ids", "attention_mask", "token_type_ids",
    "p_input_ids", "p_attention_mask", "p_token_type_ids", "personality_cls",
    "audio", "audio_lengths", "visual", "visual_lengths",
)

# Inputs the training loop leaves on the host when it moves a batch to the GPU: the cross-modal attention reads
# the longest length on the host (`int(lengths.max())`, cutting frames beyond it), which on a device tensor would
# cost a device->host sync every step; the LSTM masks and the key padding masks copy them over asynchronously.
HOST_INPUT_KEYS = ("audio_lengths", "visual_lengths")

PERSONALITY_INIT_SEED = 0  # a randomly initialised personality BERT is seeded, so prepare and training agree


def model_inputs(batch: Mapping[str, object]) -> dict[str, Tensor]:
    """The subset of a batch dict that PSAMF.forward takes."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}


# ---------------------------------------------------------------------------------------------
# Input checks: shapes in forward (free), values at the data boundary (host, once per batch)
# ---------------------------------------------------------------------------------------------

# The shape checks read only `.shape`/`.ndim`, which torch tensors and numpy arrays both have.
ArrayLike = Tensor | np.ndarray


def check_input_shapes(input_ids: ArrayLike, attention_mask: ArrayLike, audio: ArrayLike, audio_lengths: ArrayLike,
                       visual: ArrayLike, visual_lengths: ArrayLike, personality_cls: ArrayLike | None,
                       cfg: ModelConfig | None = None, personality_dim: int | None = None) -> None:
    """Shape and width checks that read no data, so `forward` runs them every step at no cost.

    Feature widths are checked only when `cfg` is given and the CLS_p width only with `personality_dim`
    (the collate knows neither; the model knows both).
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected (B, L), got shape {tuple(input_ids.shape)}")
    B = input_ids.shape[0]
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids "
                         f"{tuple(input_ids.shape)}")
    for name, x, lens in (("audio", audio, audio_lengths), ("visual", visual, visual_lengths)):
        dim = getattr(cfg, f"{name}_dim") if cfg is not None else None
        if x.ndim != 3 or x.shape[0] != B or (dim is not None and x.shape[2] != dim):
            where = f" (model.{name}_dim={dim})" if dim is not None else ""
            raise ValueError(f"{name}: expected (B={B}, T, {dim or 'D'}) features, got shape {tuple(x.shape)}"
                             f"{where}")
        if tuple(lens.shape) != (B,):
            raise ValueError(f"{name}_lengths: expected shape ({B},), got {tuple(lens.shape)}")
    if personality_cls is not None and (personality_cls.ndim != 2 or personality_cls.shape[0] != B or (
            personality_dim is not None and personality_cls.shape[1] != personality_dim)):
        raise ValueError(f"personality_cls: expected (B={B}, {personality_dim or 'H_p'}) (the personality "
                         f"encoder's width), got shape {tuple(personality_cls.shape)}")


def _host(x: ArrayLike) -> np.ndarray:
    """A numpy view of a host tensor; a device tensor is copied once (the one transfer a user entry pays)."""
    if isinstance(x, Tensor):
        x = x.detach()
        return (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()  # numpy has no bfloat16
    return np.asarray(x)


def _nonfinite_count(x: np.ndarray) -> int:
    """How many NaN/inf entries: one elementwise pass and one reduction (about 0.2 ms for a batch of 32 MOSI
    visual sequences; a float64 sum that lets NaN/inf propagate measured several times slower)."""
    finite = np.isfinite(x)
    return 0 if finite.all() else int(x.size - np.count_nonzero(finite))


def _empty_rows(mask: np.ndarray) -> list[int]:
    """Rows whose mask has at most [CLS] [SEP] (no token of the transcript), first ten."""
    return np.flatnonzero(mask.sum(axis=1) <= 2)[:10].tolist()


def check_inputs(batch: Mapping[str, object], cfg: ModelConfig | None = None, *,
                 personality_dim: int | None = None) -> None:
    """Every check on model inputs, vectorised, on host tensors or numpy arrays: a clear ValueError naming
    the field.

    Runs where the batch is still on the host (`PadCollate`, `PSAMF.predict`), because each data-dependent
    check in `forward` would be a device-to-host sync per step on a GPU. One reduction per field; the slower
    diagnostics (counts, rows, min/max) run only on the error path. `cfg` adds the feature widths and the
    personality switch; `personality_dim` the CLS_p width. The personality transcript is checked only when
    it will be encoded: no precomputed `personality_cls`, and personality enabled (or unknown, cfg=None).
    """
    for k in ("input_ids", "attention_mask", "audio", "audio_lengths", "visual", "visual_lengths"):
        if batch.get(k) is None:
            raise ValueError(f"{k}: missing from the batch (keys: {sorted(batch)})")
    cls_p = batch.get("personality_cls")
    check_input_shapes(batch["input_ids"], batch["attention_mask"], batch["audio"], batch["audio_lengths"],
                       batch["visual"], batch["visual_lengths"], cls_p, cfg, personality_dim)
    empty = _empty_rows(_host(batch["attention_mask"]))
    if empty:
        raise ValueError(f"input_ids: empty transcript (no tokens between [CLS] and [SEP]) in batch row(s) {empty}")
    for name in ("audio", "visual"):
        x, lens = _host(batch[name]), _host(batch[f"{name}_lengths"])
        bad = _nonfinite_count(x)
        if bad:
            raise ValueError(f"{name}: {bad} NaN/inf value(s) in the features; zero or drop them upstream")
        T = x.shape[1]
        if ((lens < 1) | (lens > T)).any():
            raise ValueError(f"{name}_lengths: every length must be in [1, {T}] (the padded length); "
                             f"got min {lens.min()}, max {lens.max()}")
    if cls_p is not None and _nonfinite_count(_host(cls_p)):
        raise ValueError("personality_cls: contains NaN/inf")
    p_mask = batch.get("p_attention_mask")
    if cls_p is None and p_mask is not None and (cfg is None or cfg.use_personality):
        empty = _empty_rows(_host(p_mask))
        if empty:
            raise ValueError(f"p_input_ids: empty transcript in batch row(s) {empty}")


# ---------------------------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------------------------


class RNNEncoder(nn.Module):
    """1-layer unidirectional LSTM (reference `RNNEncoder`, which packs the sequences).

    Returns the utterance vector linear_1(h_T) (B, A), h_T being the state at each sample's last valid frame, and
    the full output sequence (B, T, hidden), zero beyond each sample's length: what the reference's packed LSTM
    returns. The LSTM runs over the padded batch instead of a PackedSequence. Frames are valid-first and the LSTM
    runs forwards, so the outputs at valid frames do not depend on the padding after them and equal the packed
    ones (to float round-off, 1e-7); the padded positions are zeroed, so no gradient flows from them. The packed
    form's per-time-step bookkeeping made it 4-5x slower on a CPU (forward + backward at batch 32 over MOSI's 375 /
    500 frames: 0.13 / 0.21 s against 0.03 / 0.05 s; bench/components.py, docs/benchmarks.md). The reference's
    dropout is 0.0 with one layer (ineffective flag, reference §6 item 18), so there is none here.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int | None):
        super().__init__()
        self.rnn = nn.LSTM(in_dim, hidden, num_layers=1, bidirectional=False)
        # the utterance vector feeds only the pre-fusion tokens: not built when pre-fusion is ablated
        self.linear_1 = nn.Linear(hidden, out_dim) if out_dim is not None else None

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor | None, Tensor]:
        """`x` (B, T, D) with valid frames first; `lengths` (B,) in [1, T] (`check_inputs`), on any device."""
        B, T = x.shape[:2]
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN has no float16 LSTM on most CPUs (and low precision buys a CPU LSTM nothing): float32 there
            with torch.autocast("cpu", enabled=False):
                out, _ = self.rnn(x.float().transpose(0, 1))
        else:
            out, _ = self.rnn(x.transpose(0, 1))  # (T, B, hidden), time-major
        lengths = lengths.to(out.device, non_blocking=True)
        valid = torch.arange(T, device=out.device)[:, None] < lengths[None, :]  # (T, B)
        seq = out * valid.unsqueeze(-1).to(out.dtype)  # zero beyond each length, as pad_packed_sequence gives
        h_last = out[lengths - 1, torch.arange(B, device=out.device)]  # (B, hidden): the state at the last frame
        h = self.linear_1(h_last) if self.linear_1 is not None else None  # (B, A)
        return h, seq.transpose(0, 1)  # (B, T, hidden)


def _on_host(t: Tensor) -> Tensor:
    return t if t.device.type == "cpu" else t.cpu()


class ClipPair(NamedTuple):
    """Two batches of embeddings in a CLIP space plus the logit multiplier; losses.clip_loss uses it."""

    x: Tensor  # (B, C)
    y: Tensor  # (B, C)
    logit_scale: Tensor  # ()


class CLIPHead(nn.Module):
    """The reference `Clip(x_size, y_size)`: project both sides into a shared space.

    reference norm:  x = normalise(W_x x),  y = W_y normalise(y)  (y is *not* re-normalised; §5.2)
    symmetric norm:  x = normalise(W_x x),  y = normalise(W_y y)  (CLIP)
    The multiplier is fixed (reference: log(1/0.07) = 2.6593, used as is) or learned in log space.
    """

    def __init__(self, x_dim: int, y_dim: int, dim: int, logit_scale: float, learn_scale: bool, norm: str):
        super().__init__()
        self.x_learn_weight = nn.Linear(x_dim, dim)
        self.y_learn_weight = nn.Linear(y_dim, dim)
        self.norm = norm
        log_scale = torch.tensor(math.log(logit_scale))
        if learn_scale:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale, persistent=False)

    def forward(self, x: Tensor, y: Tensor) -> ClipPair:
        xe = F.normalize(self.x_learn_weight(x), dim=-1)  # (B, C)
        if self.norm == "reference":
            ye = self.y_learn_weight(F.normalize(y, dim=-1))  # (B, C)
        else:
            ye = F.normalize(self.y_learn_weight(y), dim=-1)  # (B, C)
        return ClipPair(xe, ye, self.log_logit_scale.exp())


class AddNormFFN(nn.Module):
    """The paper figure's Add&Norm -> Feed-Forward -> Add&Norm after a cross-modal attention."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, query: Tensor, attended: Tensor) -> Tensor:
        x = self.norm1(query + attended)  # (B, A)
        return self.norm2(x + self.ffn(x))  # (B, A)


class SubNet(nn.Module):
    """The regression head (reference `SubNet`, from MMIM): dropout -> 2 tanh layers -> linear."""

    def __init__(self, in_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)
        self.linear_3 = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.linear_2(torch.tanh(self.linear_1(self.drop(x)))))
        return self.linear_3(h).squeeze(-1)  # (B,)  no output clipping, as in the reference


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, S) 1/0 mask -> (B, 1, 1, S) additive mask for HF BERT layers (eager and SDPA alike)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_bert_layer(layer: nn.Module, h: Tensor, mask4: Tensor) -> Tensor:
    out = layer(h, attention_mask=mask4)
    return out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple, 5.x a tensor


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


@dataclass
class PSAMFOutput:
    prediction: Tensor  # (B,) sentiment score
    hidden_states: tuple[Tensor, ...]  # sentiment BERT states: 0 = embeddings, 1..N text, the pre-fusion input, then
    #                                     one per multimodal layer (the pre-fusion input only with model.use_prefusion)
    cls_personality: Tensor | None = None  # (B, H_p) CLS_p, None without personality
    align_cos: Tensor | None = None  # (B,) cos(T_s, T_p) per sample
    ccl_pair: ClipPair | None = None  # CLIP(T_s, T_p) embeddings for L_ccl
    ps_pred: Tensor | None = None  # (B,) W_y T_s' for L_ps
    clm_pairs: tuple[ClipPair, ...] = field(default_factory=tuple)  # CLIP(CLS_s, a_tok), CLIP(CLS_s, v_tok)
    fused: Tensor | None = None  # (B, F) the head's input


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class PSAMF(nn.Module):
    """PSA-MF. Build it with `build_model(cfg)`; tests may inject their own BERTs.

    text_bert:        a BertModel-like module (`.embeddings`, `.encoder.layer`) holding
                      cfg.text_layers + cfg.multimodal_layers layers; the top multimodal_layers are
                      moved into `mm_layers`.
    personality_enc:  a frozen BERT-family encoder, or None (precomputed CLS_p only, or ablated).
    """

    def __init__(self, cfg: ModelConfig, text_bert: nn.Module, personality_enc: nn.Module | None,
                 personality_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        H, A, P = cfg.hidden_size, cfg.av_dim, cfg.align_dim
        layers = text_bert.encoder.layer
        if len(layers) != cfg.bert_layers:
            raise ConfigError(f"model: the sentiment BERT has {len(layers)} layers, the config needs "
                              f"text_layers + multimodal_layers = {cfg.bert_layers}")
        # --- sentiment BERT, split at layer N: text layers stay in text_bert, the rest fuse a/v tokens
        self.text_bert = text_bert
        self.mm_layers = nn.ModuleList(list(layers[cfg.text_layers:]))  # reference: encoder.layer2
        text_bert.encoder.layer = nn.ModuleList(list(layers[: cfg.text_layers]))
        if getattr(text_bert, "pooler", None) is not None:
            text_bert.pooler = None  # unused in PSA-MF (reference §6 item 12)

        # --- frozen personality encoder
        self.personality_enc = personality_enc if cfg.use_personality else None
        if self.personality_enc is not None:
            self.personality_enc.requires_grad_(False)
            self.personality_enc.eval()
            if getattr(self.personality_enc, "pooler", None) is not None:
                self.personality_enc.pooler = None
        if personality_dim is None:
            personality_dim = self.personality_enc.config.hidden_size if self.personality_enc is not None else H
        self.personality_dim = personality_dim

        # --- audio / visual encoders
        utt_dim = A if cfg.use_prefusion else None
        self.visual_enc = RNNEncoder(cfg.visual_dim, cfg.lstm_hidden, utt_dim)
        self.acoustic_enc = RNNEncoder(cfg.audio_dim, cfg.lstm_hidden, utt_dim)

        # --- personality-sentiment alignment (reference names)
        if cfg.use_personality:
            self.text_projection = nn.Linear(H, P)  # T_s
            self.personality_projection = nn.Linear(personality_dim, P)  # T_p
            self.clip = CLIPHead(P, P, cfg.clip_dim, cfg.clip_logit_scale, cfg.clip_learn_scale, cfg.clip_norm)
        if cfg.use_ps_loss:
            if cfg.ps_separate_projection or not cfg.use_personality:
                self.text_projection2 = nn.Linear(H, P)  # T_s' (reference: a second projection)
            self.y_linear = nn.Linear(P, 1)  # W_y

        # --- pre-fusion tokens and L_clm heads (inside the BERT in the reference: BERT learning rate)
        if cfg.use_prefusion:
            if cfg.personality_tokens and personality_dim != H:
                raise ConfigError(f"model.personality_tokens adds CLS_p ({personality_dim}) to the a/v tokens, "
                                  f"which needs the personality width to equal model.hidden_size ({H})")
            self.token_v = nn.Linear(A, H)  # reference encoder.hus.linear_v.0
            self.token_a = nn.Linear(A, H)  # reference encoder.hus.linear_a.0
            if cfg.use_clm_loss:
                self.clip_ta = CLIPHead(H, H, cfg.clip_dim, cfg.clip_logit_scale, cfg.clip_learn_scale, cfg.clip_norm)
                self.clip_tv = CLIPHead(H, H, cfg.clip_dim, cfg.clip_logit_scale, cfg.clip_learn_scale, cfg.clip_norm)

        # --- cross-modal interaction: the pre-fused text vector queries each modality
        self.r_v = nn.Linear(H, A)  # M_s
        if cfg.separate_queries:
            self.r_a = nn.Linear(H, A)  # defined but unused in the reference; used here when asked
        self.attention_v = nn.MultiheadAttention(A, cfg.cross_heads, kdim=cfg.lstm_hidden, vdim=cfg.lstm_hidden)
        self.attention_a = nn.MultiheadAttention(A, cfg.cross_heads, kdim=cfg.lstm_hidden, vdim=cfg.lstm_hidden)
        if cfg.cross_block == "transformer":
            self.post_v = AddNormFFN(A, cfg.cross_ffn_dim, cfg.hidden_dropout)
            self.post_a = AddNormFFN(A, cfg.cross_ffn_dim, cfg.hidden_dropout)

        # --- multi-level enhanced fusion
        if cfg.use_enhanced_fusion:
            self.v_dim_v = nn.Linear(A, cfg.serial_dim)
            self.a_dim_v = nn.Linear(A, cfg.serial_dim)
            self.layer_norm = nn.LayerNorm(2 * cfg.serial_dim + A)
            self.ys = nn.Linear(2 * cfg.serial_dim + A, cfg.fusion_dim)  # serial F_s
            self.cnn = nn.Conv1d(3, 1, kernel_size=cfg.conv_kernel)  # parallel F_p over the 3 modalities
            head_in = (A - cfg.conv_kernel + 1) + cfg.fusion_dim
        else:
            head_in = 3 * A  # plain concatenation [V_t; A_t; M_s]
        self.fusion_prj = SubNet(head_in, cfg.head_hidden, cfg.head_dropout)

        self._init_non_bert()

    # ------------------------------------------------------------------ initialisation / groups
    def bert_module_names(self) -> tuple[str, ...]:
        """Top-level modules trained at the BERT learning rate (reference: names containing 'bert')."""
        return ("text_bert", "mm_layers", "token_v", "token_a", "clip_ta", "clip_tv")

    def _init_non_bert(self) -> None:
        """Reference init: every non-BERT weight with dim > 1 gets xavier_normal_ (§6 item 13); the
        modules inside the reference BERT (multimodal layers, tokens, L_clm heads) keep HF init."""
        bert = set(self.bert_module_names()) | {"personality_enc"}
        std = getattr(getattr(self.text_bert, "config", None), "initializer_range", 0.02)
        for name, module in self.named_children():
            if name in bert:
                continue
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_normal_(p)
        for name in ("token_v", "token_a", "clip_ta", "clip_tv"):
            if hasattr(self, name):
                for m in getattr(self, name).modules():
                    if isinstance(m, nn.Linear):
                        nn.init.normal_(m.weight, 0.0, std)
                        nn.init.zeros_(m.bias)

    def reinit_multimodal_layers(self) -> None:
        """HF BERT init (normal 0.02, LayerNorm 1/0) for the multimodal layers: the reference's fresh layer."""
        std = getattr(getattr(self.text_bert, "config", None), "initializer_range", 0.02)
        for m in self.mm_layers.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> "PSAMF":
        super().train(mode)
        if self.personality_enc is not None:
            # Frozen. The reference leaves it in train mode, so dropout perturbs CLS_p in training
            # (reference §4.2): reproduced only when cfg.personality_dropout.
            self.personality_enc.train(mode and self.cfg.personality_dropout)
        return self

    # ------------------------------------------------------------------ input checks
    def predict(self, **inputs: Tensor | None) -> PSAMFOutput:
        """The entry for tensors from a user: validate on the host, move to the model's device, run forward.

        A separate method rather than `forward(..., validate=True)`: `forward` is what the training loop,
        DDP and torch.compile call every step, so it keeps one code path free of data-dependent checks
        (each would be a device-to-host sync on a GPU), and a flag there would make either the unchecked
        path the quiet default for users or the syncing path the default for training. `predict` pays the
        checks once per call, on the host copies, before anything reaches the device. Runs without
        gradients in whatever train/eval mode the module is in (call `.eval()` first, as for any module).
        """
        inputs = {k: v for k, v in inputs.items() if v is not None}
        check_inputs(inputs, self.cfg, personality_dim=self.personality_dim)
        device = next(self.parameters()).device
        with torch.no_grad():
            return self(**{k: v.to(device) for k, v in inputs.items()})

    # ------------------------------------------------------------------ pieces of the forward pass
    def personality_cls(self, p_input_ids: Tensor | None, p_attention_mask: Tensor | None,
                        p_token_type_ids: Tensor | None = None) -> Tensor:
        """CLS_p from the frozen personality encoder (B, H_p), without gradients."""
        if self.personality_enc is None:
            raise ValueError("personality_cls: no personality encoder is loaded; pass precomputed "
                             "personality_cls or set model.personality_model")
        if p_input_ids is None or p_attention_mask is None:
            raise ValueError("p_input_ids / p_attention_mask: required to run the personality encoder "
                             "(or pass precomputed personality_cls)")
        # A 4-D additive mask, as for the sentiment layers: given the 2-D mask, HF's mask builder asks
        # `padding_mask.all()` on every call to pick an SDPA fast path, a host sync per step on a GPU.
        mask4 = additive_mask(p_attention_mask, next(self.personality_enc.parameters()).dtype)  # (B, 1, 1, L_p)
        with torch.no_grad():
            out = self.personality_enc(input_ids=p_input_ids, attention_mask=mask4, token_type_ids=p_token_type_ids)
        return out.last_hidden_state[:, 0]  # (B, H_p)

    def _cross(self, query: Tensor, seq: Tensor, lengths: Tensor, attn: nn.MultiheadAttention,
               post: nn.Module | None) -> Tensor:
        """`lengths` on the host (see HOST_INPUT_KEYS): the mask's copy to the device is asynchronous."""
        cfg = self.cfg
        T = seq.shape[1]
        key_padding_mask = None
        if cfg.cross_key_padding_mask:
            dev_len = lengths.to(seq.device, non_blocking=True)
            key_padding_mask = torch.arange(T, device=seq.device)[None, :] >= dev_len[:, None]  # (B, T)
        else:
            # Unmasked (reference): every key counts, so the frames beyond the batch's longest sequence are cut
            # first: the result then does not depend on how far the collate padded (data.frame_pad_multiple).
            seq = seq[:, : int(lengths.max())]
            T = seq.shape[1]
            if cfg.cross_pad_to is not None and T < cfg.cross_pad_to:
                # reference: LSTM outputs re-padded with zeros to 500 steps, attended without a mask
                seq = F.pad(seq, (0, 0, 0, cfg.cross_pad_to - T))  # (B, 500, hidden)
        kv = seq.transpose(0, 1)  # (T, B, hidden)
        out, _ = attn(query[None], kv, kv, key_padding_mask=key_padding_mask, need_weights=False)  # (1, B, A)
        out = out[0]  # (B, A)
        return post(query, out) if post is not None else out

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,  # (B, L) sentiment tokenizer ids
        attention_mask: Tensor,  # (B, L)
        audio: Tensor,  # (B, T_a, D_a) valid frames first
        audio_lengths: Tensor,  # (B,)
        visual: Tensor,  # (B, T_v, D_v)
        visual_lengths: Tensor,  # (B,)
        token_type_ids: Tensor | None = None,
        p_input_ids: Tensor | None = None,  # personality tokenizer ids (B, L_p)
        p_attention_mask: Tensor | None = None,
        p_token_type_ids: Tensor | None = None,
        personality_cls: Tensor | None = None,  # (B, H_p) precomputed CLS_p: skips the personality BERT
    ) -> PSAMFOutput:
        cfg = self.cfg
        # shapes only: free (no data is read). Values are checked at the data boundary (`check_inputs`, called
        # by PadCollate and PSAMF.predict), never here, where each check would stall a GPU step on a host sync.
        check_input_shapes(input_ids, attention_mask, audio, audio_lengths, visual, visual_lengths,
                           personality_cls, cfg, self.personality_dim)

        # 1. audio / visual encoders. Lengths on the host: free when the loop kept them there (HOST_INPUT_KEYS);
        # a caller's device tensors are copied once here, not once per use.
        audio_lengths, visual_lengths = _on_host(audio_lengths), _on_host(visual_lengths)
        h_v, seq_v = self.visual_enc(visual, visual_lengths)  # (B, A), (B, T_v, hidden)
        h_a, seq_a = self.acoustic_enc(audio, audio_lengths)  # (B, A), (B, T_a, hidden)

        # 2. personality encoder (frozen): CLS_p
        cls_p = None
        if cfg.use_personality:
            cls_p = personality_cls if personality_cls is not None else \
                self.personality_cls(p_input_ids, p_attention_mask, p_token_type_ids)  # (B, H_p)

        # 3. sentiment BERT, text layers 1..N, keeping every state
        h = self.text_bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, L, H)
        mask4 = additive_mask(attention_mask, h.dtype)  # (B, 1, 1, L)
        hidden = [h]
        for layer in self.text_bert.encoder.layer:
            h = run_bert_layer(layer, h, mask4)  # (B, L, H)
            hidden.append(h)
        cls_s = h[:, 0]  # (B, H) CLS_s, after layer N

        # 4. pre-fusion: a/v tokens appended to the text, through the multimodal layers
        clm_pairs: tuple[ClipPair, ...] = ()
        if cfg.use_prefusion:
            a_tok = self.token_a(h_a)  # (B, H)
            v_tok = self.token_v(h_v)  # (B, H)
            if cfg.personality_tokens:
                a_tok, v_tok = a_tok + cls_p, v_tok + cls_p  # personality-infused (reference §6 item 8)
            a_tok, v_tok = F.relu(a_tok), F.relu(v_tok)
            if cfg.use_clm_loss:
                clm_pairs = (self.clip_ta(cls_s, a_tok), self.clip_tv(cls_s, v_tok))
            ones = attention_mask.new_ones(attention_mask.shape[0], 2)
            if cfg.prefusion_input == "sequence":
                x = torch.cat([h, v_tok[:, None], a_tok[:, None]], dim=1)  # (B, L+2, H) [text; v; a]
                mm_mask = torch.cat([attention_mask, ones], dim=1)  # (B, L+2)
            else:
                x = torch.stack([cls_s, v_tok, a_tok], dim=1)  # (B, 3, H) paper: [CLS_s, X_v, X_a]
                mm_mask = torch.cat([attention_mask[:, :1], ones], dim=1)  # (B, 3)
            hidden.append(x)
        else:
            x, mm_mask = h, attention_mask  # ablation: the remaining layers read text alone
        mm_mask4 = additive_mask(mm_mask, x.dtype)
        for layer in self.mm_layers:
            x = run_bert_layer(layer, x, mm_mask4)
            hidden.append(x)
        cls_m = x[:, 0]  # (B, H) pre-fused text vector

        # 5. personality-sentiment alignment on the CLS at hidden-state index align_layer
        c = hidden[cfg.align_layer][:, 0]  # (B, H)
        align_cos = ccl_pair = ps_pred = None
        if cfg.use_personality:
            t_s = self.text_projection(c)  # (B, P)
            t_p = self.personality_projection(cls_p)  # (B, P)
            align_cos = F.cosine_similarity(t_s, t_p, dim=-1)  # (B,)
            ccl_pair = self.clip(t_s, t_p)
        if cfg.use_ps_loss:
            t_s2 = self.text_projection2(c) if hasattr(self, "text_projection2") else t_s  # (B, P)
            ps_pred = self.y_linear(t_s2).squeeze(-1)  # (B,)

        # 6. cross-modal interaction: M_s queries the visual and audio sequences
        m_s = self.r_v(cls_m)  # (B, A)
        m_a = self.r_a(cls_m) if cfg.separate_queries else m_s
        v_t = self._cross(m_s, seq_v, visual_lengths, self.attention_v, getattr(self, "post_v", None))  # (B, A)
        a_t = self._cross(m_a, seq_a, audio_lengths, self.attention_a, getattr(self, "post_a", None))  # (B, A)

        # 7. multi-level enhanced fusion
        if cfg.use_enhanced_fusion:
            serial = torch.cat([self.v_dim_v(v_t), self.a_dim_v(a_t), m_s], dim=-1)  # (B, 2*2048 + A)
            f_s = self.ys(self.layer_norm(serial))  # (B, fusion_dim)
            f_p = self.cnn(torch.stack([v_t, a_t, m_s], dim=1)).squeeze(1)  # (B, 3, A) -> (B, A - k + 1)
            fused = torch.cat([f_p, f_s], dim=-1)  # (B, A - k + 1 + fusion_dim), reference order
        else:
            fused = torch.cat([v_t, a_t, m_s], dim=-1)  # (B, 3A)

        # 8. head, in float32 even under autocast: a bf16 prediction is quantised in steps of 2^-7 near |y| = 1,
        # enough to move Acc-7 bins and the correlation of a model whose predictions are still close together
        with torch.autocast(device_type=fused.device.type, enabled=False):
            pred = self.fusion_prj(fused.float())  # (B,)
        return PSAMFOutput(prediction=pred, hidden_states=tuple(hidden), cls_personality=cls_p,
                           align_cos=align_cos, ccl_pair=ccl_pair, ps_pred=ps_pred, clm_pairs=clm_pairs,
                           fused=fused)


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def bert_config(cfg: ModelConfig, num_layers: int, vocab_size: int):
    """The HF BertConfig of the model's geometry (public: the benchmarks build a bare BERT of the same shape)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
    )


def build_text_bert(cfg: ModelConfig) -> nn.Module:
    """The sentiment BERT with text_layers + multimodal_layers layers (pretrained or random)."""
    from transformers import BertModel

    if cfg.text_model:
        try:
            bert = BertModel.from_pretrained(cfg.text_model, num_hidden_layers=cfg.bert_layers,
                                             add_pooling_layer=False,
                                             hidden_dropout_prob=cfg.hidden_dropout,
                                             attention_probs_dropout_prob=cfg.attention_dropout)
        except OSError as e:
            raise ValueError(f"model.text_model={cfg.text_model!r} could not be loaded: {e}") from None
        if bert.config.hidden_size != cfg.hidden_size:
            raise ConfigError(f"model.hidden_size={cfg.hidden_size} but {cfg.text_model} has width "
                              f"{bert.config.hidden_size}; set model.hidden_size to match")
        return bert
    return BertModel(bert_config(cfg, cfg.bert_layers, cfg.vocab_size), add_pooling_layer=False)


def load_personality_encoder(cfg: ModelConfig) -> nn.Module:
    """The frozen personality encoder (eval mode, no gradients): a BERT-family checkpoint, or a
    random BERT seeded with PERSONALITY_INIT_SEED so every process builds the same one."""
    from transformers import AutoModel, BertModel

    if cfg.personality_model:
        try:
            enc = AutoModel.from_pretrained(cfg.personality_model)
        except OSError as e:
            raise ValueError(f"model.personality_model={cfg.personality_model!r} could not be loaded: {e}") from None
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PERSONALITY_INIT_SEED)
            enc = BertModel(bert_config(cfg, cfg.personality_layers, cfg.personality_vocab_size),
                            add_pooling_layer=False)
    enc.requires_grad_(False)
    return enc.eval()


def build_model(cfg: ModelConfig, *, with_personality_encoder: bool = True) -> PSAMF:
    """Build PSA-MF from a config. `with_personality_encoder=False` skips the frozen BERT, for runs
    that feed precomputed CLS_p (its width is then cfg.hidden_size unless a checkpoint says otherwise)."""
    text_bert = build_text_bert(cfg)
    personality = load_personality_encoder(cfg) if (cfg.use_personality and with_personality_encoder) else None
    p_dim = None
    if personality is None and cfg.use_personality and cfg.personality_model:
        from transformers import AutoConfig

        p_dim = AutoConfig.from_pretrained(cfg.personality_model).hidden_size
    model = PSAMF(cfg, text_bert, personality, personality_dim=p_dim)
    if cfg.multimodal_init == "random":
        model.reinit_multimodal_layers()
    return model


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Adam parameter groups by module: the sentiment BERT (and the modules the reference keeps
    inside it) at lr_bert, everything else at lr_main. Frozen parameters are left out."""
    core = model.module if hasattr(model, "module") else model  # DDP-wrapped or not
    bert_names = core.bert_module_names()
    bert, main = [], []
    for name, p in core.named_parameters():
        if not p.requires_grad:
            continue
        (bert if name.split(".", 1)[0] in bert_names else main).append(p)
    return [
        {"params": bert, "lr": optim.lr_bert, "weight_decay": optim.weight_decay_bert, "name": "bert"},
        {"params": main, "lr": optim.lr_main, "weight_decay": optim.weight_decay_main, "name": "main"},
    ]
