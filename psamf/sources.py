"""Readers that turn the supported corpora into one canonical in-memory form, `RawDataset`.

Formats (see shared/docs/data-formats.md): MMSA pickles, MulT "noalign" pickles + label CSV
(joined by id), and custom manifests pointing at per-sample .npy/.npz features.

Contract with `psamf.prepare` (which tokenises and writes shards):
  * every split is a `RawSplit` whose arrays have one entry per utterance;
  * `audio[i]` / `visual[i]` hold only the *valid* frames, time first: shape (len_i, D), float32,
    with NaN/±inf already zeroed (and counted in `RawDataset.repairs`);
  * `ids` are normalised to "<video_id>$_$<clip_id>";
  * labels are float32 in the dataset's range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "valid", "test")


@dataclass
class RawSplit:
    ids: list[str]
    text: list[str]
    label: np.ndarray  # (N,) float32
    audio: list[np.ndarray]  # N arrays (len_i, D_a) float32, valid frames only
    visual: list[np.ndarray]  # N arrays (len_i, D_v) float32, valid frames only
    speaker: list[str] | None = None  # speaker / video id when known (used by synth and custom corpora)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class RawDataset:
    name: str  # mosi | mosei | sims | simsv2 | custom
    splits: dict[str, RawSplit]
    audio_dim: int
    visual_dim: int
    label_range: tuple[float, float]
    source_files: dict[str, str] = field(default_factory=dict)  # path -> SHA-256
    repairs: dict[str, int] = field(default_factory=dict)  # e.g. {"audio_nonfinite_values_zeroed": 12}
    padding_side: dict[str, str] = field(default_factory=dict)  # per modality, as detected in the source
