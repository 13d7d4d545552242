"""Typed, validated, YAML-serialisable configuration for psamf.

One `Config` holds five sections:

* `ModelConfig`  – the PSA-MF network, with one switch per paper-vs-reference difference
  (see `docs/paper-vs-code.md` §4) and one per ablation row of the paper;
* `LossConfig`   – the weights of the named loss terms;
* `OptimConfig`  – optimiser, schedule, early stopping, seed, precision;
* `DataConfig`   – where the shards live and how batches are built;
* `RunConfig`    – Ray Train scaling, storage and failure handling.

Presets (`Config.preset(name)`): `tiny` (tests, demos), `paper` (the method as the paper
describes it, bert-base geometry), `reference` / `reference-mosei` (what the official code
computes). Every section rejects unknown keys and impossible combinations with a message that
names the field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from psamf.datasets import DatasetName
from psamf.storage import atomic_open

__all__ = [
    "ConfigError",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "DataConfig",
    "RunConfig",
    "Config",
    "PRESETS",
    "ABLATIONS",
    "ablate",
]

REFERENCE_LOGIT_SCALE = math.log(1 / 0.07)  # 2.6593: the reference code multiplies by log(1/τ), not exp
CLIP_LOGIT_SCALE = 1 / 0.07  # 14.2857: CLIP's exp(log(1/0.07)), τ = 0.07


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent. The message names the field."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    # --- sentiment BERT (trainable) ---------------------------------------------------------
    text_model: str | None = None  # HF hub name or local path; None = random init from the geometry below
    vocab_size: int = 30522  # bert-base-uncased
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    text_layers: int = 11  # N: pure-text layers (reference hard-codes 11)
    multimodal_layers: int = 1  # 12 - N: layers that also read the audio/visual tokens
    multimodal_init: Literal["random", "pretrained"] = "random"  # reference: a fresh layer; paper: "the remaining layers"
    align_layer: int = 10  # hidden-state index for the alignment losses (0 = embeddings); reference: 10
    # --- personality BERT (frozen) ----------------------------------------------------------
    personality_model: str | None = None  # HF name/path of a BERT-family checkpoint; None = random init
    personality_layers: int = 12  # geometry when randomly initialised (width = hidden_size)
    personality_vocab_size: int = 30522
    personality_dropout: bool = True  # reference quirk: the frozen BERT is left in train mode (dropout on CLS_p)
    # --- audio / visual encoders ------------------------------------------------------------
    audio_dim: int = 5  # MOSI COVAREP 5, MOSEI 74, SIMS 33
    visual_dim: int = 20  # MOSI FACET 20, MOSEI 35, SIMS 709
    lstm_hidden: int = 64
    av_dim: int = 64  # utterance vector after the 64->64 linear; also the cross-modal width
    # --- alignment --------------------------------------------------------------------------
    align_dim: int = 64  # T_s, T_p projection width
    clip_dim: int = 128  # inner width of every CLIP head
    clip_logit_scale: float = REFERENCE_LOGIT_SCALE
    clip_learn_scale: bool = False  # learn log-scale as CLIP does (paper reading); reference: fixed
    clip_norm: Literal["reference", "symmetric"] = "reference"  # reference: y normalised *before* projection only
    # batch_dissimilarity: reference code; per_sample_dissimilarity: paper preset; per_sample_cosine: the paper's
    # text read literally, which rewards anti-alignment (see psamf/losses.py)
    sim_mode: Literal["batch_dissimilarity", "per_sample_dissimilarity", "per_sample_cosine"] = "batch_dissimilarity"
    ps_separate_projection: bool = True  # reference: L_ps uses text_projection2, not T_s
    # --- pre-fusion -------------------------------------------------------------------------
    personality_tokens: bool = True  # reference: a/v tokens = ReLU(W h + CLS_p)
    prefusion_input: Literal["sequence", "cls"] = "sequence"  # reference: whole text sequence + 2 tokens
    # --- cross-modal interaction ------------------------------------------------------------
    cross_heads: int = 2
    cross_key_padding_mask: bool = False  # reference attends over zero padding
    cross_pad_to: int | None = 500  # reference pads LSTM outputs to 500 steps (matters only without a mask)
    cross_block: Literal["bare", "transformer"] = "bare"  # transformer = Add&Norm + FFN + Add&Norm (paper figure)
    cross_ffn_dim: int = 256
    separate_queries: bool = False  # reference: r_v queries both modalities (r_a unused)
    # --- enhanced fusion and head -----------------------------------------------------------
    serial_dim: int = 2048  # V_t, A_t -> 2048 before the LayerNorm
    fusion_dim: int = 128  # serial output
    conv_kernel: int = 3
    head_hidden: int = 128
    head_dropout: float = 0.1
    # --- ablations (paper, ablation table) --------------------------------------------------
    use_personality: bool = True
    use_prefusion: bool = True
    use_enhanced_fusion: bool = True
    use_ps_loss: bool = True
    use_clm_loss: bool = True

    def __post_init__(self) -> None:
        p = "model."
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                     "text_layers", "audio_dim", "visual_dim", "lstm_hidden", "av_dim", "align_dim",
                     "clip_dim", "cross_heads", "serial_dim", "fusion_dim", "conv_kernel", "head_hidden",
                     "personality_layers", "personality_vocab_size", "max_position_embeddings",
                     "cross_ffn_dim"):
            _check(getattr(self, name) >= 1, f"{p}{name} must be >= 1, got {getattr(self, name)}")
        _check(self.multimodal_layers >= 0, f"{p}multimodal_layers must be >= 0")
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"{p}hidden_size ({self.hidden_size}) must divide into {p}num_attention_heads "
               f"({self.num_attention_heads}) heads")
        _check(self.av_dim % self.cross_heads == 0,
               f"{p}av_dim ({self.av_dim}) must divide into {p}cross_heads ({self.cross_heads}) heads")
        _check(0 <= self.align_layer <= self.text_layers,
               f"{p}align_layer ({self.align_layer}) must be a text hidden-state index in "
               f"[0, text_layers={self.text_layers}]: alignment beyond the text layers is not defined")
        _check(self.conv_kernel <= self.av_dim,
               f"{p}conv_kernel ({self.conv_kernel}) must not exceed av_dim ({self.av_dim})")
        for name in ("hidden_dropout", "attention_dropout", "head_dropout"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"{p}{name} must be in [0, 1), got {v}")
        _check(self.clip_logit_scale > 0, f"{p}clip_logit_scale must be > 0")
        _check(self.cross_pad_to is None or self.cross_pad_to >= 1, f"{p}cross_pad_to must be >= 1 or null")
        if self.use_prefusion:
            _check(self.multimodal_layers >= 1,
                   f"{p}use_prefusion=true needs {p}multimodal_layers >= 1 (got 0)")
        if self.use_clm_loss:
            _check(self.use_prefusion,
                   f"{p}use_clm_loss=true needs {p}use_prefusion=true: L_clm contrasts the pre-fusion tokens "
                   "(use ablate(cfg, 'no_prefusion'), which turns both off)")
        if self.personality_tokens:
            _check(self.use_personality,
                   f"{p}personality_tokens=true needs {p}use_personality=true "
                   "(use ablate(cfg, 'no_personality'), which turns both off)")

    @property
    def bert_layers(self) -> int:
        """Layers of the sentiment BERT checkpoint that the model consumes (text + multimodal)."""
        return self.text_layers + self.multimodal_layers


@dataclass
class LossConfig:
    w_l1: float = 1.0  # task loss |y_hat - y|
    w_ccl: float = 1.0  # composite contrastive (personality-sentiment) loss
    w_ps: float = 0.1  # personalised sentiment constraint; reference 0.1, paper 1
    w_clm: float = 0.09  # cross-modal contrastive loss; reference 0.09, paper 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            _check(v >= 0 and math.isfinite(v), f"loss.{f.name} must be a finite number >= 0, got {v}")


@dataclass
class OptimConfig:
    lr_bert: float = 5e-5  # reference, MOSI (MOSEI: 1e-5); applies to every parameter inside the sentiment BERT
    lr_main: float = 5e-4  # reference, MOSI (MOSEI: 1e-4)
    weight_decay_bert: float = 1e-4
    weight_decay_main: float = 1e-4
    batch_size: int = 32  # per worker
    epochs: int = 100
    grad_clip: float = 1.0  # clip_grad_norm_; 0 disables
    plateau_patience: int = 20  # ReduceLROnPlateau on validation loss (reference `--when`)
    plateau_factor: float = 0.5
    early_stop_patience: int | None = None  # epochs without validation improvement; None = off (reference)
    select_metric: str = "val_loss"  # model selection on validation only
    select_mode: Literal["min", "max"] = "min"
    seed: int = 1007
    # auto = bf16 on GPUs that support it, off on CPU; fp16 = float16 autocast with dynamic loss scaling (GPUs
    # without bf16: V100, T4)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    # micro-batches per optimiser step: the global batch is batch_size x run.num_workers x grad_accum, so the
    # reference's 128 on 4 workers is batch_size=32 (x 4 workers) or batch_size=16 with grad_accum=2 on 4 workers
    # of half the memory
    grad_accum: int = 1
    # torch.compile the BERT layers (engine.maybe_compile; state_dict names unchanged). Off by default: compiling
    # costs a minute or more per worker process and gained nothing on the CPU; see docs/benchmarks.md, "torch.compile"
    compile: bool = False

    def __post_init__(self) -> None:
        p = "optim."
        for name in ("lr_bert", "lr_main"):
            v = getattr(self, name)
            _check(v > 0 and math.isfinite(v), f"{p}{name} must be > 0, got {v}")
        for name in ("weight_decay_bert", "weight_decay_main", "grad_clip"):
            _check(getattr(self, name) >= 0, f"{p}{name} must be >= 0")
        _check(self.batch_size >= 2, f"{p}batch_size must be >= 2 (in-batch contrastive losses), got {self.batch_size}")
        _check(self.epochs >= 1, f"{p}epochs must be >= 1")
        _check(self.grad_accum >= 1, f"{p}grad_accum must be >= 1 (micro-batches per optimiser step), got {self.grad_accum}")
        _check(self.plateau_patience >= 0, f"{p}plateau_patience must be >= 0")
        _check(0 < self.plateau_factor < 1, f"{p}plateau_factor must be in (0, 1)")
        _check(self.early_stop_patience is None or self.early_stop_patience >= 1,
               f"{p}early_stop_patience must be >= 1 or null")
        _check(self.select_metric.startswith("val_"),
               f"{p}select_metric must be a validation metric (val_*), got {self.select_metric!r}: "
               "models are never selected on test")


@dataclass
class DataConfig:
    uri: str = "data/shards/mosi"  # shard directory: local path, s3://, gs://
    dataset: DatasetName = "mosi"  # a corpus of psamf.datasets (validated against the registry)
    max_text_len: int = 50  # tokens, both tokenizers
    tokenizer: str = "bert-base-uncased"  # sentiment tokenizer; "psamf:tiny" = the packaged synthetic vocab
    personality_tokenizer: str = "bert-base-uncased"
    use_precomputed_personality: bool = True  # use the shards' personality_cls column when present
    # Training batches of similar transcript length (padding-free batches): each window of group_window batches is
    # sorted by transcript length times a random factor in [1 - length_noise, 1 + length_noise], cut into batches,
    # and the batch order shuffled, all reseeded every epoch. On by default: on MOSI-shaped data it cuts padded
    # token positions from 56 % to 12 % and a paper-preset CPU epoch by 44 %, at unchanged accuracy over seeds
    # (docs/benchmarks.md, "Length grouping"); the reference presets turn it off (the reference shuffles uniformly).
    length_grouping: bool = True
    length_noise: float = 0.05  # 0 = strict sort (random tie-break only); larger = more varied batches, more padding
    group_window: int = 16  # batches per shuffle / length-grouping window
    prefetch_batches: int = 2
    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO/moto; else AWS_ENDPOINT_URL_S3 / AWS default
    shuffle_seed: int = 0  # train order: file shuffle (reseeded per pass) + per-epoch window permutation
    normalize_features: bool = False  # z-score audio/visual with the manifest's train stats (read time); reference: off
    materialize: bool = True  # read each split into the object store once: later epochs skip Parquet (docs/benchmarks.md)
    # Pad each batch's token width (to a multiple of this, at most max_text_len) and frame count (to a multiple of
    # this) beyond the batch's longest, so that a run sees a handful of shapes: kernels are chosen (and
    # torch.compile specialises) once per shape. Padding is masked, so one forward's predictions do not change (within
    # 1e-5), but round-off compounds over training (the pinned demo's metrics move), so the default is off (1 =
    # the batch's longest); 8 / 32 are the suggested values on a GPU.
    token_pad_multiple: int = 1
    frame_pad_multiple: int = 1

    def __post_init__(self) -> None:
        _check(bool(self.uri), "data.uri must not be empty")
        _check(3 <= self.max_text_len <= 512,
               f"data.max_text_len must be in [3, 512] ([CLS], at least one token, [SEP]), got {self.max_text_len}")
        _check(self.group_window >= 1, "data.group_window must be >= 1")
        _check(0.0 <= self.length_noise < 1.0, f"data.length_noise must be in [0, 1) (a relative jitter of the "
                                               f"transcript length when grouping), got {self.length_noise}")
        _check(self.prefetch_batches >= 0, "data.prefetch_batches must be >= 0")
        for name in ("token_pad_multiple", "frame_pad_multiple"):
            _check(getattr(self, name) >= 1, f"data.{name} must be >= 1 (1 = pad to the batch's longest), "
                                             f"got {getattr(self, name)}")
        _check(0 <= self.shuffle_seed < 2**32, f"data.shuffle_seed must be in [0, 2**32), got {self.shuffle_seed}")
        _check(self.s3_endpoint is None or self.s3_endpoint.startswith(("http://", "https://")),
               f"data.s3_endpoint must be an http(s):// URL or null, got {self.s3_endpoint!r}")


@dataclass
class RunConfig:
    name: str = "psamf-run"  # resume key: re-running the same (storage_path, name) resumes
    storage_path: str = "runs"  # local dir or s3://bucket/prefix
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    # elastic training (Ray Train V2): > 0 lets a run start or go on with as few as min_workers ranks while nodes
    # are missing (a lost spot node, a slow autoscaler) and grow back to num_workers when they come; 0 = fixed size.
    # The global batch follows the live worker count (batch_size x workers x grad_accum).
    min_workers: int = 0
    elastic_resize_interval_s: float = 60.0  # how often a healthy elastic run checks whether it can grow
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts from the latest checkpoint; -1 = unlimited
    # worker-group starts that time out (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) and other controller errors Ray Train
    # retries before the run fails (its FailureConfig.controller_failure_limit), counted apart from max_failures.
    # -1 = forever (Ray's default: nodes may take long to come through an autoscaler); a number ends a run whose
    # workers can never be placed (a missing node type, a quota) instead of retrying it until someone stops the job
    controller_failure_limit: int = -1
    keep_checkpoints: int = 2  # best k by optim.select_metric; Ray also always keeps the latest (resume point)
    s3_endpoint: str | None = None  # custom S3 endpoint for an s3:// storage_path (MinIO, moto); else data.s3_endpoint, then AWS_ENDPOINT_URL_S3
    # extra Ray resources each worker holds, e.g. {"accelerator_type:A10G": 0.001} to pin a GPU model, or a custom
    # resource of a node group (cluster/local/autoscaling.yaml's "accel" stands in for a GPU)
    worker_resources: dict[str, float] = field(default_factory=dict)
    # how often Ray Train's controller polls the workers: a worker's epoch report (and checkpoint) is registered at
    # the next poll, and every epoch waits for it; Ray's own default (2 s) sets a 2-second floor on an epoch.
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in the environment overrides it (psamf.runtime.fit_trainer)
    controller_poll_s: float = 0.25

    def __post_init__(self) -> None:
        for k, v in self.worker_resources.items():
            _check(bool(k) and k not in ("CPU", "GPU", "memory", "object_store_memory"),
                   f"run.worker_resources: {k!r} is not a custom resource (CPU and GPU have their own keys: "
                   "run.cpus_per_worker, run.use_gpu + run.gpus_per_worker)")
            _check(v > 0, f"run.worker_resources.{k} must be > 0, got {v}")
        _check(bool(self.name) and "/" not in self.name, f"run.name must be a non-empty name without '/', got {self.name!r}")
        _check(self.num_workers >= 0, "run.num_workers must be >= 0 (0 = Ray Train local mode)")
        _check(0 <= self.min_workers <= self.num_workers,
               f"run.min_workers must be in [0, run.num_workers={self.num_workers}] (0 = a fixed worker count), "
               f"got {self.min_workers}")
        _check(self.elastic_resize_interval_s > 0, "run.elastic_resize_interval_s must be > 0")
        _check(0 < self.controller_poll_s <= 60, f"run.controller_poll_s must be in (0, 60] seconds, "
               f"got {self.controller_poll_s}")
        _check(self.cpus_per_worker > 0, "run.cpus_per_worker must be > 0")
        _check(self.gpus_per_worker > 0, "run.gpus_per_worker must be > 0")
        _check(self.max_failures >= -1, "run.max_failures must be >= -1")
        _check(self.controller_failure_limit >= -1, "run.controller_failure_limit must be >= -1 (-1 = retry forever)")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
        _check(bool(self.storage_path), "run.storage_path must not be empty")
        _check(self.s3_endpoint is None or self.s3_endpoint.startswith(("http://", "https://")),
               f"run.s3_endpoint must be an http(s):// URL or null, got {self.s3_endpoint!r}")

    def scaling_kwargs(self) -> dict[str, Any]:
        """`ray.train.ScalingConfig` arguments: the worker count (a (min, max) range when elastic), GPU use and what
        each worker holds."""
        elastic = 0 < self.min_workers < self.num_workers
        return {"num_workers": (self.min_workers, self.num_workers) if elastic else self.num_workers,
                "use_gpu": self.use_gpu, "resources_per_worker": self.resources_per_worker(),
                **({"elastic_resize_monitor_interval_s": self.elastic_resize_interval_s} if elastic else {})}

    def reserved_cpus(self) -> float:
        """The CPUs a run's workers hold: num_workers x cpus_per_worker (local mode, 0 workers: its one process)."""
        return max(1, self.num_workers) * self.cpus_per_worker

    def resources_per_worker(self) -> dict[str, float]:
        """What one Ray Train worker holds: its CPUs, its GPU share when use_gpu, and the custom resources."""
        res = {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}
        res.update(self.worker_resources)
        return res


# --------------------------------------------------------------------------------------------
# Top level, (de)serialisation
# --------------------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "run": RunConfig,
}


@dataclass
class Config:
    preset: str = "custom"  # the preset this config was derived from (informational)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ---- presets ----
    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(PRESETS)

    @classmethod
    def from_preset(cls, name: str) -> "Config":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        cfg = PRESETS[name]()
        cfg.preset = name
        return cfg

    # ---- dict / YAML ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> "Config":
        """Build a config. If `d` names a `preset`, its values start from that preset."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {"preset", *_SECTIONS}
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; "
                              f"allowed: preset, {', '.join(_SECTIONS)}")
        preset = d.get("preset", "custom")
        if preset not in PRESETS and preset != "custom":
            raise ConfigError(f"{source}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        base = cls.from_preset(preset).to_dict() if preset in PRESETS else cls().to_dict()
        sections = {}
        for name, typ in _SECTIONS.items():
            merged = dict(base[name])
            given = d.get(name) or {}
            if not isinstance(given, Mapping):
                raise ConfigError(f"{source}: section '{name}' must be a mapping")
            for k, v in given.items():
                if k not in merged:
                    raise ConfigError(f"{source}: unknown key '{name}.{k}'; allowed: {sorted(merged)}")
                merged[k] = v
            sections[name] = _build_section(typ, merged, name, source)
        return cls(preset=preset, **sections)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            with atomic_open(Path(path), "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        return cls.from_dict(read_yaml_file(path, "config"), source=str(path))

    def override(self, items: list[str] | tuple[str, ...]) -> "Config":
        """Apply `section.key=value` overrides (values parsed as YAML scalars). Returns a new config."""
        return self.replace(parse_overrides(items), source="override")

    def replace(self, values: Mapping[str, Any], *, source: str = "replace") -> "Config":
        """A new config with `values` applied, validated like a YAML file.

        Keys are dotted (`{"optim.lr_main": 1e-4}`) or nested (`{"optim": {"lr_main": 1e-4}}`); both forms may
        be mixed. Unknown sections or fields, wrong types and impossible combinations raise ConfigError naming
        the key and `source`. The preset is not re-applied on top of the values."""
        d = self.to_dict()
        for key, value in _flatten(values).items():
            parts = key.split(".")
            if len(parts) != 2 or parts[0] not in _SECTIONS:
                raise ConfigError(f"{source}: key {key!r} must be <section>.<field> with section in "
                                  f"{list(_SECTIONS)}")
            sec, fld = parts
            if fld not in d[sec]:
                raise ConfigError(f"{source}: unknown key '{sec}.{fld}'; allowed: {sorted(d[sec])}")
            d[sec][fld] = value
        return _from_sections(self.preset, d, source)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["section.key=value", ...]` -> `{"section.key": value}`, values parsed as YAML scalars (the last of a key
    wins). Keys are checked where the values are applied (`Config.replace`)."""
    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            values[key.strip()] = raw
    return values


def read_yaml_file(path: str | Path, what: str) -> Any:
    """A YAML file's content ({} when empty); a missing file or bad YAML is a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}, "run.name": "x"} -> {"optim.lr": 1, "run.name": "x"} (one level of sections)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if not prefix and k in _SECTIONS and isinstance(v, Mapping):
            out.update(_flatten(v, f"{k}."))
        else:
            out[key] = v
    return out


def _from_sections(preset: str, d: Mapping[str, Any], source: str) -> Config:
    """A Config from a full `to_dict()`-shaped mapping, every section validated."""
    return Config(preset=preset, **{n: _build_section(t, d[n], n, source) for n, t in _SECTIONS.items()})


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check/coerce `value` against a (simple) annotation. Returns (ok, coerced)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            for word in (("off", "no", "false") if not value else ("on", "yes", "true")):
                if word in choices:
                    return True, word
        return (value in choices), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, Mapping):
            return False, value
        out = {}
        for k, v in value.items():
            ok_k, k2 = _type_ok(k, kt)
            ok_v, v2 = _type_ok(v, vt)
            if not (ok_k and ok_v):
                return False, value
            out[k2] = v2
        return True, out
    return isinstance(value, tp), value


def _build_section(typ: type, values: Mapping[str, Any], section: str, source: str):
    hints = typing.get_type_hints(typ)
    kwargs = {}
    for f in dataclasses.fields(typ):
        v = values[f.name]
        ok, coerced = _type_ok(v, hints[f.name])
        if not ok:
            raise ConfigError(f"{source}: {section}.{f.name} must be {_type_name(hints[f.name])}, got {v!r}")
        kwargs[f.name] = coerced
    try:
        return typ(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is dict:
        return "a mapping of " + " to ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _reference() -> Config:
    """What the official code computes (docs/paper-vs-code.md §3, §4), MOSI hyperparameters."""
    return Config(
        model=ModelConfig(text_model=None, personality_model=None),  # set paths to load weights
        loss=LossConfig(w_l1=1.0, w_ccl=1.0, w_ps=0.1, w_clm=0.09),
        optim=OptimConfig(lr_bert=5e-5, lr_main=5e-4, batch_size=128, epochs=100, plateau_patience=20),
        data=DataConfig(dataset="mosi", length_grouping=False),  # the reference's DataLoader shuffles uniformly
    )


def _reference_mosei() -> Config:
    cfg = _reference()
    cfg.model.audio_dim, cfg.model.visual_dim = 74, 35
    cfg.optim.lr_bert, cfg.optim.lr_main, cfg.optim.batch_size = 1e-5, 1e-4, 128
    cfg.data = DataConfig(dataset="mosei", uri="data/shards/mosei", length_grouping=False)
    return cfg


def _paper() -> Config:
    """The method as the paper states it: bert-base, pretrained upper layers, per-sample (dis)similarity weighting,
    unit weights, masked cross-modal transformer blocks with Add&Norm + FFN, a query per modality.

    One departure from the literal text: the per-sample weight of L_ccl is the dissimilarity (1 - cos) / 2, the
    direction the reference code uses, not cos itself; cos * CLIP is minimised by anti-aligning T_s and T_p
    (`model.sim_mode=per_sample_cosine` keeps the literal form)."""
    return Config(
        model=ModelConfig(
            text_layers=11, multimodal_layers=1, multimodal_init="pretrained", align_layer=11,
            personality_dropout=False, clip_logit_scale=CLIP_LOGIT_SCALE, clip_learn_scale=False,
            clip_norm="symmetric", sim_mode="per_sample_dissimilarity", ps_separate_projection=False,
            personality_tokens=False, prefusion_input="cls", cross_key_padding_mask=True,
            cross_pad_to=None, cross_block="transformer", separate_queries=True,
        ),
        loss=LossConfig(w_l1=1.0, w_ccl=1.0, w_ps=1.0, w_clm=1.0),
        optim=OptimConfig(lr_bert=5e-5, lr_main=5e-4, batch_size=32, epochs=100, early_stop_patience=10),
        data=DataConfig(dataset="mosi"),
    )


def _tiny() -> Config:
    """A 3-layer, 32-wide BERT built from BertConfig: seconds on a CPU, for tests and demos."""
    return Config(
        model=ModelConfig(
            vocab_size=512, hidden_size=32, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, text_layers=2, multimodal_layers=1, align_layer=1,
            personality_layers=2, personality_vocab_size=512, personality_dropout=False,
            lstm_hidden=16, av_dim=16, align_dim=16, clip_dim=16, cross_pad_to=None,
            cross_key_padding_mask=True, cross_ffn_dim=32, serial_dim=64, fusion_dim=32, head_hidden=32,
        ),
        loss=LossConfig(),
        optim=OptimConfig(lr_bert=1e-3, lr_main=3e-3, batch_size=32, epochs=6, plateau_patience=2,
                          early_stop_patience=None),
        data=DataConfig(uri="data/shards/mosi-synth", tokenizer="psamf:tiny",
                        personality_tokenizer="psamf:tiny", max_text_len=32),
        run=RunConfig(name="tiny-demo", num_workers=2),
    )


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "tiny": _tiny,
    "paper": _paper,
    "reference": _reference,
    "reference-mosei": _reference_mosei,
}

# --------------------------------------------------------------------------------------------
# Ablations (paper, ablation table): each name turns off exactly what the row names
# --------------------------------------------------------------------------------------------

ABLATIONS: dict[str, dict[str, Any]] = {
    # no personality encoder: no CLS_p in the a/v tokens, no L_ccl; L_ps keeps its regression
    # form with weight factor 1 (there is no similarity to weight it by)
    "no_personality": {"use_personality": False, "personality_tokens": False},
    # no multimodal encoder: the text BERT runs all layers on text alone; no a/v tokens, no L_clm
    "no_prefusion": {"use_prefusion": False, "use_clm_loss": False},
    # serial + parallel fusion replaced by the plain concatenation [V_t; A_t; M_s] into the head
    "no_enhanced_fusion": {"use_enhanced_fusion": False},
    "no_ps": {"use_ps_loss": False},
    "no_clm": {"use_clm_loss": False},
}


def ablate(cfg: Config, name: str) -> Config:
    """Return a copy of `cfg` with one ablation row of the paper applied."""
    if name not in ABLATIONS:
        raise ConfigError(f"unknown ablation {name!r}; choose one of {sorted(ABLATIONS)}")
    d = cfg.to_dict()
    d["model"].update(ABLATIONS[name])
    return _from_sections(cfg.preset, d, f"ablation {name}")
