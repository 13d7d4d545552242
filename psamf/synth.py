"""Seeded synthetic MOSI-, MOSEI-, SIMS- and SIMS v2-shaped corpora (the library behind `psamf synth`).

The corpora have the real releases' shapes (docs/data-formats.md) and carry a learnable,
documented signal, so that the whole pipeline (readers, prepare, training, ablations) can be exercised without
the public data sets, which cannot be downloaded here.

Output formats (`--format`)
---------------------------
* ``mmsa``   — one MMSA-style pickle (``unaligned_50.pkl`` for MOSI/MOSEI, ``unaligned_39.pkl`` for SIMS,
  ``sims_unaligned.pkl`` for SIMS v2): ``{"train","valid","test"}`` with per-split keys ``raw_text, text,
  text_bert, audio, vision, audio_lengths, vision_lengths, id, annotations, regression_labels`` (+ for SIMS and
  SIMS v2 ``regression_labels_T/A/V`` and ``classification_labels_T/A/V``). Frames are **valid-first** (zero
  padding at the end), ids are ``"<video>$_$<clip>"``.
* ``mult``   — a MulT "noalign" pickle (``mosi_data_noalign.pkl``, ``mosei_senti_data_noalign.pkl``,
  ``sims_data_noalign.pkl``, ``simsv2_data_noalign.pkl``) with per-split ``vision (N,T_v,d_v)``, ``audio
  (N,T_a,d_a)``, ``text`` (GloVe slot), ``labels (N,1,1)``, ``id (N,3)`` where ``id[:,0] = "<video>_<clip>"``
  (``bytes`` for MOSI, as in the real file) and ``id[:,1:]`` start/end times; frames are **left-padded** (zeros
  before the valid frames). Plus ``label.csv`` (columns ``video_id, clip_id, text, label, label_T, label_A,
  label_V, annotation, mode``) whose rows are in a **shuffled order**, so only a join by id is right.
* ``custom`` — ``manifest.csv`` (``id, split, text, label, speaker, audio_path, visual_path``) with relative
  paths to ``audio/<n>.npy`` arrays ``(len, d_a)`` and ``visual/<n>.npz`` archives (key ``features``, ``(len, d_v)``).

Text-feature slots: ``text`` (MMSA BERT features, really ``(N, L, 768)``) and the MulT GloVe ``text`` (really
``(N, 50, 300)``) are not used by psamf, which tokenises the transcript itself. They are written as float32 zeros of
shape ``(N, L, 1)`` by default to keep files small; ``--full-text-features`` writes the real widths (768 / 300).
``text_bert`` holds real ``[CLS] … [SEP]`` ids of the packaged ``psamf:tiny`` vocabulary, mask and segment ids.
All numeric arrays are float32.

Sizes: each split has ``max(2, round(n · scale))`` clips (n from docs/data-formats.md) spread over
``max(1, round(videos · scale))`` videos (MOSI 52/10/31 and MOSEI 2249/300/678 as in the CMU folds; SIMS 36/12/12
and SIMS v2 90/22/34 invented). All transcripts, SIMS included, use the same English synthetic lexicon.

Generative process (per kind; constants in `KindSpec` and below)
-----------------------------------------------------------------
Speakers are videos (one speaker per video, several clips per video; splits are video-disjoint like the CMU
folds). For video ``v`` draw a latent **expressiveness** ``e_v ~ Beta(0.6, 0.6)`` in [0, 1] (a personality trait)
and a per-dimension speaker offset ``~ N(0, 0.3²)`` for each modality (a nuisance). For each clip draw three
latents

    t   ~ N(0, 1)                               verbal sentiment
    u_a = 0.3 t + sqrt(1 - 0.09) z_a            acoustic affect      (z ~ N(0, 1))
    u_v = 0.3 t + sqrt(1 - 0.09) z_v            visual affect

and the gate ``g_v = 0.2 + 1.6 e_v`` (0.2 … 1.8, mean 1): an expressive speaker's nonverbal behaviour carries
a lot of their sentiment, a reserved speaker's very little. The latent score is

    y* = shift + scale * ( t + 0.8 g_v (u_a + u_v) + 0.5 (2 e_v - 1) )

and the label is the mean of ``annotators`` simulated ratings ``clip(round(y* + N(0, σ_ann)), -R, R)`` with R = 3
(MOSI 5 annotators ⇒ multiples of 0.2, MOSEI 3 ⇒ multiples of 1/3) or R = 1 (SIMS, SIMS v2: 5 annotators ⇒
multiples of 0.2 in [-1, 1]); exact zeros occur when the ratings cancel. SIMS unimodal labels rate
``scale·1.6·t`` (T), ``scale·1.6·g_v·u_a`` (A) and ``scale·1.6·g_v·u_v`` (V) the same way.

What a model can observe:

* **Words.** A transcript of ~lognormal length mixes neutral words, ``Poisson(1 + 1.5 |t|)`` sentiment words
  (each positive with probability ``sigmoid(3 t)``, drawn from `POSITIVE_WORDS` / `NEGATIVE_WORDS`), occasional
  intensifiers, and **style words** revealing personality: ``Poisson(2.5 e_v)`` words from `EXPRESSIVE_WORDS`
  and ``Poisson(2.5 (1 - e_v))`` from `RESERVED_WORDS` (``--personality-signal strong``: see
  below). Every word is in ``psamf/assets/tiny-vocab.txt``.
* **Audio / vision.** Frames are AR(1)-smoothed Gaussian noise plus the speaker offset; on a fixed set of "cue"
  dimensions (the first ``max(1, d // 4)``) the frame mean is shifted by ``±1.0·u_a`` (audio) or ``±1.0·u_v``
  (vision); then each dimension gets a fixed scale and offset (features are not standardised, as in COVAREP /
  FACET). Lengths follow a lognormal clip duration (median ≈ 1/3 of the maximum, long clips truncated).
* **Personality** only through the style words. Because ``g_v`` multiplies the nonverbal cues, a model that
  infers ``e_v`` from the wording can weight the audio/visual evidence per speaker; removing the personality
  signal measurably hurts (tests/test_synth.py checks this with a ridge regression).

**Personality signal** (``--personality-signal``, `SIGNALS`). ``weak`` is everything above and the default: the
corpora as they always were (their demo metrics are pinned in the tests). On them a pretrained personality
encoder did not help PSA-MF (docs/benchmarks.md, "Personality pretraining"), plausibly because ~2.5 style words
per transcript leave e_v barely identifiable per clip and the 30 style words are frequent enough for the sentiment
BERT to learn them from the sentiment labels itself. ``strong`` is the deliberate alternative for showing what
personality pretraining buys; it changes four things, identically in the sentiment corpora and in
``--kind bigfive`` (what it does and does not show yet: docs/benchmarks.md):

* **denser**: ``Poisson(8 e_v)`` expressive + ``Poisson(8 (1 - e_v))`` reserved style words per transcript (they
  take the place of neutral words: 14.8 words per MOSI transcript on average instead of 13.3), which makes e_v
  identifiable from one clip (the expressive share of a clip's style words correlates ≈ 0.88 with e_v, against
  ≈ 0.70 under ``weak``);
* **rarer**: the style words come from `RARE_EXPRESSIVE_WORDS` / `RARE_RESERVED_WORDS`, 64 each, instead of the
  15 + 15 common ones. In a small sentiment corpus each appears only a few dozen times, over few speakers (MOSI
  at scale 0.3 has 16 training speakers), so the sentiment BERT can hardly learn what they mean from sentiment
  labels, while a Big Five corpus (thousands of clips, over hundreds of speakers, labelled with the trait itself)
  teaches it to a personality encoder: the situation of the paper, where the personality BERT is fine-tuned on
  a separate personality corpus;
* **weightier**: the additive personality term of the latent score is ``1.0 (2 e_v - 1)`` instead of
  ``0.5 (2 e_v - 1)`` (the gate g_v is unchanged), so knowing e_v is worth more test MAE;
* **idiolects** (``PersonalitySignal.idiolect``, 4): each speaker uses only 4 expressive and 4 reserved words of
  the two lists, drawn once per speaker (stream ``"idiolect"``). What a word means has to be learnt across
  speakers: MOSI at scale 1.0 has 52 training speakers, who use 122 of the 128 style words, a median word by 3 of
  them, while a Big Five corpus at scale 1.0 has 1,200 speakers, a median word used by 60, each labelled with the
  trait. Without idiolects the style words were common enough that PSA-MF without personality learnt them from
  the sentiment labels, and tied with the full model (docs/benchmarks.md).

**Big Five corpus** (``--kind bigfive``, `synthesize_bigfive`): new speakers from the same prior, written by the same
`_transcript`, with five trait scores per speaker; extraversion is e_v itself (see `bigfive_traits`). It is what
`psamf personality pretrain` fine-tunes a personality encoder on, so that the encoder learns to read e_v from the
style words; that encoder's CLS is then what `prepare --personality-model` stores for PSA-MF.

Defects planted like the real files': in ≈4 % of clips (at least one per split) some audio values are ``-inf``
(COVAREP), and in ≈4 % a short run of visual frames is all ``NaN`` (face lost). Frames are never all-zero, so
zero rows are always padding.

Determinism: every random stream is seeded from ``(seed, kind, stream)``; same arguments ⇒ byte-identical files
(pickle protocol 4, fixed zip timestamps in .npz, fixed CSV formatting). Files are written atomically
(temporary name, then rename). The latent variables are available from `generate` for tests.
"""

from __future__ import annotations

import csv
import io
import math
import os
import pickle
import time
import zipfile
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from psamf.datasets import CORPORA
from psamf.progress import Progress, note
from psamf.storage import atomic_open

__all__ = [
    "KINDS",
    "FORMATS",
    "KindSpec",
    "SynthSplit",
    "SynthCorpus",
    "POSITIVE_WORDS",
    "NEGATIVE_WORDS",
    "INTENSIFIERS",
    "EXPRESSIVE_WORDS",
    "RESERVED_WORDS",
    "NEUTRAL_WORDS",
    "LEXICON",
    "PersonalitySignal",
    "SIGNALS",
    "RARE_EXPRESSIVE_WORDS",
    "RARE_RESERVED_WORDS",
    "generate",
    "synthesize",
    "BIGFIVE_TRAITS",
    "BIGFIVE_FORMATS",
    "BigFiveSplit",
    "bigfive_traits",
    "generate_bigfive",
    "synthesize_bigfive",
]

SPLITS = ("train", "valid", "test")
FORMATS = ("mmsa", "mult", "custom")

# ------------------------------------------------------------------------------------------------
# Lexicon (all lower case; psamf/assets/tiny-vocab.txt lists every word after its first 83 lines)
# ------------------------------------------------------------------------------------------------

NEUTRAL_WORDS: tuple[str, ...] = tuple(
    "the an this that it is was you we they he she movie film story plot actor actors actress character "
    "characters scene scenes ending music director acting script dialogue camera effects cast sequel trailer "
    "theater time part parts whole first second last end think thought felt feel saw watched seen went see "
    "go going got had have has be been about of to in on with for at as and but or just all some lot bit "
    "kind thing things one two me my his her their there what when how because if then also even still more "
    "much out up into by from would could did do does can will make made were are around people friends "
    "family night day book version original audience minutes hour hours way actually".split()
)
POSITIVE_WORDS: tuple[str, ...] = tuple(
    "good great love loved excellent amazing wonderful enjoyed fantastic brilliant beautiful best fun funny "
    "nice awesome perfect liked favorite recommend happy fresh charming clever solid powerful touching "
    "entertaining impressive superb hilarious stunning delightful glad pleasant smart cool sweet enjoyable "
    "moving".split()
)
NEGATIVE_WORDS: tuple[str, ...] = tuple(
    "bad terrible awful hate hated boring worst horrible disappointing disappointed poor waste stupid "
    "annoying dull ugly sad mess weak lame predictable pointless confusing slow bland painful ridiculous "
    "mediocre forgettable unfunny tedious cheap silly sloppy awkward fails failed wrong worse flat".split()
)
INTENSIFIERS: tuple[str, ...] = tuple("very really extremely incredibly pretty so absolutely truly".split())
#: style words of expressive speakers (high e_v)
EXPRESSIVE_WORDS: tuple[str, ...] = tuple(
    "wow oh literally totally super gosh yeah seriously crazy dude like honestly whoa man ah hey".split()
)
#: style words of reserved speakers (low e_v)
RESERVED_WORDS: tuple[str, ...] = tuple(
    "um uh perhaps somewhat fairly suppose guess maybe rather mostly probably generally hmm well "
    "arguably moderately".split()
)
#: rare style words of expressive speakers, used only by ``personality_signal="strong"`` (see `SIGNALS`)
RARE_EXPRESSIVE_WORDS: tuple[str, ...] = tuple(
    "yay woo woohoo yikes omg lol haha hah boom bam wham zing wowza yowza golly jeez geez heck dang darn "
    "wild insane epic mega ultra hyper massive huge bonkers nuts legit lit dope rad stoked pumped hyped "
    "buzzing bro guys folks yo hiya howdy whee whoo ooh aah eek shout scream yell blast party dance jump "
    "loud yeehaw hooray bravo kaboom zoom vroom sparkle".split()
)
#: rare style words of reserved speakers, used only by ``personality_signal="strong"``
RARE_RESERVED_WORDS: tuple[str, ...] = tuple(
    "possibly presumably apparently seemingly somehow admittedly conceivably relatively reasonably "
    "partly partially slightly marginally occasionally sometimes usually typically largely essentially "
    "basically roughly approximately nearly almost barely hardly scarcely mildly quietly modestly "
    "tentatively cautiously hesitantly reluctantly erm er ahem anyway anyhow nonetheless nevertheless "
    "however though although whereas albeit likely unlikely unsure uncertain doubtful debatable depends "
    "assume presume imagine gather reckon believe suspect wonder hesitate consider ponder".split()
)
#: every word the generator can emit, in tiny-vocab.txt order
LEXICON: tuple[str, ...] = (
    NEUTRAL_WORDS + POSITIVE_WORDS + NEGATIVE_WORDS + INTENSIFIERS + EXPRESSIVE_WORDS + RESERVED_WORDS
    + RARE_EXPRESSIVE_WORDS + RARE_RESERVED_WORDS
)

# ------------------------------------------------------------------------------------------------
# Kinds
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KindSpec:
    """Shape and label conventions of one real release (docs/data-formats.md)."""

    name: str
    split_sizes: tuple[int, int, int]  # train, valid, test clips at scale 1
    split_videos: tuple[int, int, int]  # videos (= speakers) per split at scale 1
    audio_dim: int
    visual_dim: int
    audio_frames: int  # padded length T_a
    vision_frames: int  # padded length T_v
    text_len: int  # text_bert length L
    label_max: int  # R: labels in [-R, R]
    annotators: int
    annot_noise: float  # σ_ann of one simulated rating
    label_scale: float
    label_shift: float
    mmsa_file: str
    mult_file: str
    unimodal_labels: bool  # SIMS-style regression_labels_T/A/V
    bytes_ids: bool  # MulT id[:,0] stored as bytes (MOSI)
    video_style: str  # "youtube" (11-char ids, may contain "_") or "sims" ("video_0001")

    @property
    def label_range(self) -> tuple[float, float]:
        return (-float(self.label_max), float(self.label_max))


def _sizes(kind: str) -> tuple[int, int, int]:
    sizes = CORPORA[kind].split_sizes
    assert sizes is not None
    return sizes


def _dims(kind: str) -> tuple[int, int]:
    dims = CORPORA[kind].feature_dims
    assert dims is not None
    return dims


# split sizes and feature widths come from the corpus registry (psamf.datasets); the rest is synth's own
KINDS: dict[str, KindSpec] = {
    "mosi": KindSpec(
        name="mosi", split_sizes=_sizes("mosi"), split_videos=(52, 10, 31),
        audio_dim=_dims("mosi")[0], visual_dim=_dims("mosi")[1],
        audio_frames=375, vision_frames=500, text_len=50, label_max=3, annotators=5, annot_noise=0.6,
        label_scale=0.85, label_shift=0.05, mmsa_file="unaligned_50.pkl", mult_file="mosi_data_noalign.pkl",
        unimodal_labels=False, bytes_ids=True, video_style="youtube",
    ),
    "mosei": KindSpec(
        name="mosei", split_sizes=_sizes("mosei"), split_videos=(2249, 300, 678), audio_dim=_dims("mosei")[0],
        visual_dim=_dims("mosei")[1], audio_frames=500, vision_frames=500, text_len=50, label_max=3, annotators=3,
        annot_noise=0.5, label_scale=0.55, label_shift=0.35, mmsa_file="unaligned_50.pkl",
        mult_file="mosei_senti_data_noalign.pkl", unimodal_labels=False, bytes_ids=False,
        video_style="youtube",
    ),
    "sims": KindSpec(
        name="sims", split_sizes=_sizes("sims"), split_videos=(36, 12, 12),
        audio_dim=_dims("sims")[0], visual_dim=_dims("sims")[1],
        audio_frames=400, vision_frames=55, text_len=39, label_max=1, annotators=5, annot_noise=0.45,
        label_scale=0.35, label_shift=-0.1, mmsa_file="unaligned_39.pkl", mult_file="sims_data_noalign.pkl",
        unimodal_labels=True, bytes_ids=False, video_style="sims",
    ),
    # SIMS v2 dims/lengths as in MMSA's config ([768, 25, 177], seq_lens [50, 925, 232]); video count invented
    "simsv2": KindSpec(
        name="simsv2", split_sizes=_sizes("simsv2"), split_videos=(90, 22, 34),
        audio_dim=_dims("simsv2")[0], visual_dim=_dims("simsv2")[1],
        audio_frames=925, vision_frames=232, text_len=50, label_max=1, annotators=5, annot_noise=0.45,
        label_scale=0.35, label_shift=0.0, mmsa_file="sims_unaligned.pkl", mult_file="simsv2_data_noalign.pkl",
        unimodal_labels=True, bytes_ids=False, video_style="sims",
    ),
}

# generative constants (see the module docstring)
_BETA_E = 0.6  # e_v ~ Beta(0.6, 0.6)
_RHO = 0.3  # corr(t, u_a) = corr(t, u_v)
_W_NONVERBAL = 0.8
_W_PERSONALITY = 0.5
_CUE_SHIFT = 1.0
_STYLE_RATE = 2.5  # the "weak" signal's style words per transcript
_SPEAKER_OFFSET = 0.3  # std of the per-speaker, per-dimension feature offset (nuisance)
_AR = 0.7  # AR(1) coefficient of the frame noise
_DEFECT_RATE = 0.04
_STREAMS = {"speakers": 1, "text": 2, "audio": 3, "vision": 4, "labels": 5, "order": 6, "latents": 7, "ids": 8,
            "idiolect": 9}


@dataclass(frozen=True)
class PersonalitySignal:
    """How strongly a corpus plants personality (module docstring, "Personality signal"): one value for the
    sentiment corpora and the Big Five corpus alike, so a personality encoder pretrained on one reads the other."""

    name: str
    style_rate: float  # style words per transcript: Poisson(rate·e) expressive + Poisson(rate·(1-e)) reserved
    expressive: tuple[str, ...]  # style words of expressive speakers (high e_v)
    reserved: tuple[str, ...]  # style words of reserved speakers (low e_v)
    w_personality: float  # weight of the additive personality term 2 e_v - 1 in the latent score y*
    idiolect: int | None = None  # style words per speaker and side (a fixed subset of each list); None: all

    def speaker_styles(self, n_speakers: int, rng: np.random.Generator) -> list[tuple[tuple[str, ...], ...]]:
        """Each speaker's (expressive, reserved) style words: the whole lists, or with `idiolect` a subset of
        that many words of each, drawn per speaker without replacement (the only draws from `rng`)."""
        if self.idiolect is None:
            return [(self.expressive, self.reserved)] * n_speakers
        k = self.idiolect
        return [(tuple(self.expressive[j] for j in rng.choice(len(self.expressive), k, replace=False)),
                 tuple(self.reserved[j] for j in rng.choice(len(self.reserved), k, replace=False)))
                for _ in range(n_speakers)]


#: ``weak`` (the default, the corpora as they always were) and ``strong`` (a personality encoder can show its use)
SIGNALS: dict[str, PersonalitySignal] = {
    "weak": PersonalitySignal("weak", _STYLE_RATE, EXPRESSIVE_WORDS, RESERVED_WORDS, _W_PERSONALITY),
    "strong": PersonalitySignal("strong", 8.0, RARE_EXPRESSIVE_WORDS, RARE_RESERVED_WORDS, 1.0, idiolect=4),
}


def _signal(name: str) -> PersonalitySignal:
    if name not in SIGNALS:
        raise ValueError(f"synth: unknown personality_signal {name!r}; choose one of {list(SIGNALS)}")
    return SIGNALS[name]


def _rng(seed: int, kind: str, stream: str, split: str = "") -> np.random.Generator:
    """An independent, reproducible stream per (seed, kind, stream, split)."""
    key = [int(seed) & 0xFFFFFFFF, list(KINDS).index(kind), _STREAMS[stream], (SPLITS.index(split) + 1) if split else 0]
    return np.random.default_rng(np.random.SeedSequence(key))


# ------------------------------------------------------------------------------------------------
# In-memory corpus
# ------------------------------------------------------------------------------------------------


@dataclass
class SynthSplit:
    """One split. Frames are stored valid-first with zero padding: ``audio[i, :audio_lengths[i]]`` are the valid
    frames (possibly containing the planted -inf / NaN values)."""

    videos: list[str]
    clips: list[str]
    text: list[str]
    label: np.ndarray  # (N,) float32
    audio: np.ndarray  # (N, T_a, d_a) float32, valid-first
    vision: np.ndarray  # (N, T_v, d_v) float32, valid-first
    audio_lengths: np.ndarray  # (N,) int64
    vision_lengths: np.ndarray  # (N,) int64
    start_end: np.ndarray  # (N, 2) float64 clip start/end seconds (MulT id[:,1:])
    unimodal: dict[str, np.ndarray] = field(default_factory=dict)  # "T","A","V" -> (N,) float32 (SIMS only)
    # latents (ground truth for tests)
    expressiveness: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) e_v of the clip's speaker
    t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    u_a: np.ndarray = field(default_factory=lambda: np.zeros(0))
    u_v: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def ids(self) -> list[str]:
        """Canonical ids ``"<video>$_$<clip>"``."""
        return [f"{v}$_${c}" for v, c in zip(self.videos, self.clips)]

    def audio_frames(self, i: int) -> np.ndarray:
        return self.audio[i, : self.audio_lengths[i]]

    def vision_frames(self, i: int) -> np.ndarray:
        return self.vision[i, : self.vision_lengths[i]]


@dataclass
class SynthCorpus:
    spec: KindSpec
    seed: int
    scale: float
    splits: dict[str, SynthSplit]
    personality_signal: str = "weak"


def scaled_size(n: int, scale: float, minimum: int) -> int:
    return max(minimum, int(round(n * scale)))


def _video_ids(kind: KindSpec, n: int, rng: np.random.Generator) -> list[str]:
    if kind.video_style == "sims":
        return [f"video_{i + 1:04d}" for i in range(n)]
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"))
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        vid = "".join(rng.choice(alphabet, size=11))
        if vid not in seen:
            seen.add(vid)
            out.append(vid)
    if n >= 2 and not any("_" in v for v in out):  # real YouTube ids can contain "_": exercise that path
        out[0] = out[0][:5] + "_" + out[0][6:]
    return out


def _clip_counts(n_clips: int, n_videos: int, rng: np.random.Generator) -> np.ndarray:
    """Clips per video: every video gets at least one; the rest are spread with Dirichlet weights."""
    n_videos = min(n_videos, n_clips)
    counts = np.ones(n_videos, dtype=np.int64)
    extra = n_clips - n_videos
    if extra > 0:
        counts += rng.multinomial(extra, rng.dirichlet(np.full(n_videos, 2.0)))
    return counts


def _annotate(latent: np.ndarray, kind: KindSpec, rng: np.random.Generator) -> np.ndarray:
    """Mean of `annotators` rounded, clipped noisy ratings of `latent` -> float32 labels."""
    r = kind.label_max
    ratings = np.clip(np.rint(latent[:, None] + rng.normal(0.0, kind.annot_noise, (len(latent), kind.annotators))), -r, r)
    return (ratings.sum(axis=1) / kind.annotators).astype(np.float32)


def _transcript(t: float, e: float, rng: np.random.Generator, signal: PersonalitySignal = SIGNALS["weak"],
                styles: tuple[tuple[str, ...], ...] | None = None) -> str:
    """One transcript; `styles` = the speaker's (expressive, reserved) style words, default the signal's lists."""
    expressive, reserved = styles if styles is not None else (signal.expressive, signal.reserved)
    n_sent = int(rng.poisson(1.0 + 1.5 * abs(t)))
    p_pos = 1.0 / (1.0 + math.exp(-3.0 * t))
    words: list[str] = []
    for _ in range(n_sent):
        lex = POSITIVE_WORDS if rng.random() < p_pos else NEGATIVE_WORDS
        if rng.random() < 0.15 + 0.15 * min(abs(t), 2.0):
            words.append(INTENSIFIERS[rng.integers(len(INTENSIFIERS))])
        words.append(lex[rng.integers(len(lex))])
    n_exp = int(rng.poisson(signal.style_rate * e))
    n_res = int(rng.poisson(signal.style_rate * (1.0 - e)))
    words += [expressive[k] for k in rng.integers(len(expressive), size=n_exp)]
    words += [reserved[k] for k in rng.integers(len(reserved), size=n_res)]
    target = int(np.clip(np.rint(rng.lognormal(math.log(11.0), 0.5)), 3, 45))
    n_neutral = max(1, target - len(words))
    words += [NEUTRAL_WORDS[k] for k in rng.integers(len(NEUTRAL_WORDS), size=n_neutral)]
    order = rng.permutation(len(words))
    return " ".join(words[k] for k in order)


def _frames(
    n: int,
    frames: int,
    dim: int,
    lengths: np.ndarray,
    speaker_offset: np.ndarray,  # (N, dim)
    cue: np.ndarray,  # (N,)
    affine: tuple[np.ndarray, np.ndarray],  # per-dim (scale, offset), shared by all splits
    rng: np.random.Generator,
) -> np.ndarray:
    """Valid-first float32 frames (N, frames, dim): AR(1) noise + speaker offset + cue shift, per-dim affine."""
    from scipy.signal import lfilter

    n_cue = max(1, dim // 4)
    cue_w = np.zeros(dim, dtype=np.float32)
    cue_w[:n_cue] = _CUE_SHIFT * np.where(np.arange(n_cue) % 2 == 0, 1.0, -1.0)
    dim_scale, dim_offset = affine
    out = np.zeros((n, frames, dim), dtype=np.float32)
    chunk = max(1, 2_000_000 // max(1, frames * dim))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        noise = rng.standard_normal((hi - lo, frames, dim), dtype=np.float32)
        noise = lfilter([math.sqrt(1 - _AR**2)], [1.0, -_AR], noise, axis=1).astype(np.float32)
        x = noise + speaker_offset[lo:hi, None, :] + cue[lo:hi, None, None] * cue_w[None, None, :]
        x = x * dim_scale + dim_offset
        # an exactly all-zero valid frame is (practically) impossible, so zero rows are always padding
        mask = np.arange(frames)[None, :] < lengths[lo:hi, None]
        out[lo:hi] = np.where(mask[:, :, None], x, np.float32(0.0))
    return out


def _plant_defects(
    x: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, mode: str
) -> None:
    """In place: -inf values ('audio') or NaN frame runs ('vision') in ≈4 % of clips, at least one."""
    n = len(lengths)
    hit = np.flatnonzero(rng.random(n) < _DEFECT_RATE)
    if hit.size == 0 and n > 0:
        hit = np.array([rng.integers(n)])
    for i in hit:
        length = int(lengths[i])
        if mode == "audio":
            for _ in range(int(rng.integers(1, 4))):
                x[i, rng.integers(length), rng.integers(x.shape[2])] = -np.inf
        else:
            run = int(min(length, rng.integers(1, 5)))
            start = int(rng.integers(0, length - run + 1))
            x[i, start : start + run, :] = np.nan


def _affine(dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fixed per-dimension scale and offset of a modality (raw features are not standardised)."""
    dim_scale = np.exp(rng.uniform(-1.0, 1.5, dim)).astype(np.float32)
    dim_offset = (rng.normal(0.0, 2.0, dim) * dim_scale).astype(np.float32)
    return dim_scale, dim_offset


def _lengths(max_frames: int, duration: np.ndarray) -> np.ndarray:
    """Frame counts from clip durations (fraction of the maximum), at least 1, truncated at `max_frames`."""
    return np.clip(np.rint(duration * max_frames), 1, max_frames).astype(np.int64)


def generate(kind: str, seed: int = 0, scale: float = 1.0, personality_signal: str = "weak") -> SynthCorpus:
    """Generate a corpus in memory (see the module docstring for the generative process and `SIGNALS`)."""
    signal = _signal(personality_signal)
    if kind not in KINDS:
        raise ValueError(f"synth: unknown kind {kind!r}; choose one of {sorted(KINDS)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"synth: scale must be a finite number > 0, got {scale}")
    spec = KINDS[kind]
    id_rng = _rng(seed, kind, "ids")
    n_videos_all = [scaled_size(v, scale, 1) for v in spec.split_videos]
    all_videos = _video_ids(spec, sum(n_videos_all), id_rng)
    a_affine = _affine(spec.audio_dim, _rng(seed, kind, "audio"))
    v_affine = _affine(spec.visual_dim, _rng(seed, kind, "vision"))
    splits: dict[str, SynthSplit] = {}
    v_lo = 0
    for s_idx, split in enumerate(SPLITS):
        n = scaled_size(spec.split_sizes[s_idx], scale, 2)
        vids = all_videos[v_lo : v_lo + n_videos_all[s_idx]]
        v_lo += n_videos_all[s_idx]
        r_spk = _rng(seed, kind, "speakers", split)
        counts = _clip_counts(n, len(vids), r_spk)
        e_video = r_spk.beta(_BETA_E, _BETA_E, len(counts))
        a_off_video = r_spk.normal(0.0, _SPEAKER_OFFSET, (len(counts), spec.audio_dim)).astype(np.float32)
        v_off_video = r_spk.normal(0.0, _SPEAKER_OFFSET, (len(counts), spec.visual_dim)).astype(np.float32)
        video_of = np.repeat(np.arange(len(counts)), counts)  # (N,) video index per clip
        videos = [vids[k] for k in video_of]
        clips: list[str] = []
        for c in counts:
            clips += [f"{j + 1:04d}" if spec.video_style == "sims" else str(j + 1) for j in range(int(c))]
        e = e_video[video_of]
        g = 0.2 + 1.6 * e

        r_lat = _rng(seed, kind, "latents", split)
        t = r_lat.standard_normal(n)
        u_a = _RHO * t + math.sqrt(1 - _RHO**2) * r_lat.standard_normal(n)
        u_v = _RHO * t + math.sqrt(1 - _RHO**2) * r_lat.standard_normal(n)
        duration = np.minimum(r_lat.lognormal(math.log(1 / 3), 0.55, n), 1.0)  # fraction of the max length
        jitter = r_lat.uniform(0.85, 1.15, n)

        r_text = _rng(seed, kind, "text", split)
        styles = signal.speaker_styles(len(counts), _rng(seed, kind, "idiolect", split))
        text = [_transcript(float(t[i]), float(e[i]), r_text, signal, styles[video_of[i]]) for i in range(n)]

        r_lab = _rng(seed, kind, "labels", split)
        y_star = spec.label_shift + spec.label_scale * (
            t + _W_NONVERBAL * g * (u_a + u_v) + signal.w_personality * (2 * e - 1)
        )
        label = _annotate(y_star, spec, r_lab)
        unimodal: dict[str, np.ndarray] = {}
        if spec.unimodal_labels:
            unimodal = {
                "T": _annotate(spec.label_scale * 1.6 * t, spec, r_lab),
                "A": _annotate(spec.label_scale * 1.6 * g * u_a, spec, r_lab),
                "V": _annotate(spec.label_scale * 1.6 * g * u_v, spec, r_lab),
            }

        a_len = _lengths(spec.audio_frames, duration)
        v_len = _lengths(spec.vision_frames, np.minimum(duration * jitter, 1.0))
        r_a = _rng(seed, kind, "audio", split)
        audio = _frames(n, spec.audio_frames, spec.audio_dim, a_len, a_off_video[video_of], u_a.astype(np.float32), a_affine, r_a)
        _plant_defects(audio, a_len, r_a, "audio")
        r_v = _rng(seed, kind, "vision", split)
        vision = _frames(n, spec.vision_frames, spec.visual_dim, v_len, v_off_video[video_of], u_v.astype(np.float32), v_affine, r_v)
        _plant_defects(vision, v_len, r_v, "vision")

        # clip start/end times within the video (seconds), for MulT id[:,1:]
        secs = duration * 15.0
        start = np.zeros(n)
        for k in range(len(counts)):
            idx = np.flatnonzero(video_of == k)
            ends = np.cumsum(secs[idx] + 0.5)
            start[idx] = ends - secs[idx]
        start_end = np.round(np.stack([start, start + secs], axis=1), 3)

        splits[split] = SynthSplit(
            videos=videos, clips=clips, text=text, label=label, audio=audio, vision=vision,
            audio_lengths=a_len, vision_lengths=v_len, start_end=start_end, unimodal=unimodal,
            expressiveness=e, t=t, u_a=u_a, u_v=u_v,
        )
    return SynthCorpus(spec=spec, seed=seed, scale=scale, splits=splits, personality_signal=signal.name)


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def _atomic_pickle(path: Path, obj: object) -> None:
    with atomic_open(path) as f:  # streamed: full-scale pickles are large
        pickle.dump(obj, f, protocol=4)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    """A .npz (zip of .npy) with fixed timestamps, so identical inputs give identical bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, _npy_bytes(arr))
    return buf.getvalue()


def _fmt_float(x: float) -> str:
    """Shortest text that reads back to the same float32."""
    return np.format_float_positional(np.float32(x), trim="-")


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _annotation(y: float) -> str:
    return "Negative" if y < 0 else ("Positive" if y > 0 else "Neutral")


def _class3(y: np.ndarray) -> np.ndarray:
    return (np.sign(y) + 1).astype(np.float32)  # 0 Neg, 1 Neu, 2 Pos


def _load_vocab() -> dict[str, int]:
    from psamf.tokenizers import tiny_vocab_path

    with open(tiny_vocab_path(), encoding="utf-8") as f:
        vocab = {tok: i for i, tok in enumerate(line.rstrip("\n") for line in f if line.strip())}
    missing = [w for w in LEXICON if w not in vocab]
    if missing:
        raise ValueError(f"synth: words missing from {tiny_vocab_path()}: {missing[:10]}")
    return vocab


def _text_bert(texts: list[str], length: int, vocab: dict[str, int]) -> np.ndarray:
    """(N, 3, L) float32: [CLS] ids [SEP] padded with [PAD], attention mask, segment ids (all 0).

    Every synthetic word is a whole entry of the tiny vocabulary, so whole-word lookup equals WordPiece."""
    out = np.zeros((len(texts), 3, length), dtype=np.float32)
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    for i, text in enumerate(texts):
        ids = [cls] + [vocab[w] for w in text.split()][: length - 2] + [sep]
        out[i, 0, : len(ids)] = ids
        out[i, 1, : len(ids)] = 1
    return out


def _write_mmsa(corpus: SynthCorpus, out_dir: Path, full_text_features: bool) -> dict[str, Path]:
    spec = corpus.spec
    vocab = _load_vocab()
    data: dict[str, dict[str, np.ndarray]] = {}
    for split, s in corpus.splits.items():
        n = len(s)
        d: dict[str, np.ndarray] = {
            "raw_text": np.array(s.text, dtype=object),
            "text": np.zeros((n, spec.text_len, 768 if full_text_features else 1), dtype=np.float32),
            "text_bert": _text_bert(s.text, spec.text_len, vocab),
            "audio": s.audio,
            "vision": s.vision,
            "audio_lengths": s.audio_lengths.copy(),
            "vision_lengths": s.vision_lengths.copy(),
            "id": np.array(s.ids, dtype=object),
            "annotations": np.array([_annotation(float(y)) for y in s.label], dtype=object),
            "regression_labels": s.label,
        }
        for m in ("T", "A", "V"):
            if m in s.unimodal:
                d[f"regression_labels_{m}"] = s.unimodal[m]
                d[f"classification_labels_{m}"] = _class3(s.unimodal[m])
        data[split] = d
    path = out_dir / spec.mmsa_file
    _atomic_pickle(path, data)
    return {"pickle": path}


def _write_mult(corpus: SynthCorpus, out_dir: Path, full_text_features: bool, seed: int) -> dict[str, Path]:
    spec = corpus.spec
    data: dict[str, dict[str, np.ndarray]] = {}
    rows: list[list[str]] = []
    for split, s in corpus.splits.items():
        n = len(s)
        audio = np.zeros_like(s.audio)
        vision = np.zeros_like(s.vision)
        for i in range(n):  # left padding: zeros first, then the valid frames
            la, lv = int(s.audio_lengths[i]), int(s.vision_lengths[i])
            audio[i, spec.audio_frames - la :] = s.audio[i, :la]
            vision[i, spec.vision_frames - lv :] = s.vision[i, :lv]
        ids = [[f"{v}_{c}", f"{a:.3f}", f"{b:.3f}"] for v, c, (a, b) in zip(s.videos, s.clips, s.start_end)]
        # MOSI's real file stores bytes (numpy "S" dtype); the others str
        id_arr = np.array([[x.encode("utf-8") for x in row] for row in ids]) if spec.bytes_ids else np.array(ids)
        data[split] = {
            "vision": vision,
            "audio": audio,
            "text": np.zeros((n, 50, 300 if full_text_features else 1), dtype=np.float32),
            "labels": s.label.reshape(n, 1, 1).copy(),
            "id": id_arr,
        }
        for i in range(n):
            uni = [_fmt_float(s.unimodal[m][i]) if m in s.unimodal else "" for m in ("T", "A", "V")]
            rows.append([s.videos[i], s.clips[i], s.text[i], _fmt_float(s.label[i]), *uni,
                         _annotation(float(s.label[i])), split])
    order = _rng(seed, spec.name, "order").permutation(len(rows))  # a different order from the pickle
    pkl = out_dir / spec.mult_file
    _atomic_pickle(pkl, data)
    header = ["video_id", "clip_id", "text", "label", "label_T", "label_A", "label_V", "annotation", "mode"]
    csv_path = out_dir / "label.csv"
    _atomic_write_bytes(csv_path, _csv_bytes(header, [rows[k] for k in order]))
    return {"pickle": pkl, "label_csv": csv_path}


def _write_custom(corpus: SynthCorpus, out_dir: Path, progress: bool = False) -> dict[str, Path]:
    rows: list[list[str]] = []
    k = 0
    n_total = sum(len(s) for s in corpus.splits.values())
    with Progress("synth: writing feature files", n_total, unit="utterance", enabled=progress) as bar:
        for split, s in corpus.splits.items():
            for i in range(len(s)):
                _write_custom_row(corpus, out_dir, split, s, i, k, rows)
                k += 1
                bar.update(1)
    manifest = out_dir / "manifest.csv"
    header = ["id", "split", "text", "label", "speaker", "audio_path", "visual_path"]
    _atomic_write_bytes(manifest, _csv_bytes(header, rows))
    return {"manifest": manifest}


def _write_custom_row(corpus: SynthCorpus, out_dir: Path, split: str, s: "Any", i: int, k: int,
                      rows: list[list[str]]) -> None:
    """One utterance of the custom format: its two feature files and its manifest row."""
    a_rel = f"audio/{k:06d}.npy"
    v_rel = f"visual/{k:06d}.npz"
    _atomic_write_bytes(out_dir / a_rel, _npy_bytes(s.audio_frames(i)))
    _atomic_write_bytes(out_dir / v_rel, _npz_bytes(features=s.vision_frames(i)))
    rows.append([s.ids[i], split, s.text[i], _fmt_float(s.label[i]), s.videos[i], a_rel, v_rel])


def synthesize(
    kind: str,
    fmt: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    scale: float = 1.0,
    full_text_features: bool = False,
    progress: bool = False,
    personality_signal: str = "weak",
) -> dict[str, Path]:
    """Generate a corpus and write it in `fmt` under `out_dir`.

    `personality_signal`: ``"weak"`` (default) or ``"strong"``, see `SIGNALS` and the module docstring.

    `progress`: say on stderr what is happening (generation, then writing; a bar on a terminal, plain lines
    otherwise): at scale 1 a MOSEI-sized corpus takes tens of seconds, which must not look like a hang.

    Returns the written top-level files: ``{"pickle": …}`` (mmsa), ``{"pickle": …, "label_csv": …}`` (mult) or
    ``{"manifest": …}`` (custom). Same arguments ⇒ byte-identical files.
    """
    if fmt not in FORMATS:
        raise ValueError(f"synth: unknown format {fmt!r}; choose one of {list(FORMATS)}")
    t0 = time.perf_counter()
    note(f"synth: generating {kind} (seed {seed}, scale {scale}) ...", enabled=progress)
    corpus = generate(kind, seed=seed, scale=scale, personality_signal=personality_signal)
    n = sum(len(s) for s in corpus.splits.values())
    note(f"synth: generated {n} utterances ({time.perf_counter() - t0:.1f} s); writing {fmt} files to {out_dir}",
         enabled=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "mmsa":
        paths = _write_mmsa(corpus, out, full_text_features)
    elif fmt == "mult":
        paths = _write_mult(corpus, out, full_text_features, seed)
    else:
        paths = _write_custom(corpus, out, progress)
    note(f"synth: done ({time.perf_counter() - t0:.1f} s)", enabled=progress)
    return paths


# ------------------------------------------------------------------------------------------------
# Big Five corpus (`psamf synth --kind bigfive`): the personality side of the same generative story
# ------------------------------------------------------------------------------------------------

#: the five trait columns of a Big Five corpus, in this order (ChaLearn First Impressions' order)
BIGFIVE_TRAITS: tuple[str, ...] = ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")
BIGFIVE_FORMATS: tuple[str, ...] = ("csv", "parquet")
#: clips and speakers per split at scale 1 (ChaLearn First Impressions: 6000 / 2000 / 2000 clips)
BIGFIVE_SPLIT_SIZES: tuple[int, int, int] = (6000, 2000, 2000)
BIGFIVE_SPLIT_SPEAKERS: tuple[int, int, int] = (1200, 400, 400)
_BIGFIVE_KEY = 100  # the `kind` slot of the seed key (after the sentiment kinds' indices)
_AGREEABLE_SHIFT = 1.0  # mean verbal sentiment of a clip: _AGREEABLE_SHIFT * (2 a_v - 1)


@dataclass
class BigFiveSplit:
    """One split of a Big Five corpus: one row per clip, trait scores are the speaker's (as in ChaLearn)."""

    ids: list[str]
    speakers: list[str]
    text: list[str]
    traits: np.ndarray  # (N, 5) float32 in [0, 1], columns BIGFIVE_TRAITS

    def __len__(self) -> int:
        return len(self.ids)


def bigfive_traits(e: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(N, 5) trait scores from the expressiveness `e` (N,) and four further latents `z` (N, 4) in [0, 1].

    extraversion IS e_v (the latent the sentiment corpora gate the nonverbal cues with); agreeableness is z_1,
    which the transcripts show through the sentiment words' polarity; the other three mix e_v with a latent the
    text never shows (so no encoder can predict them perfectly: openness 0.6 e + 0.4 z_0, conscientiousness
    0.3 (1 - e) + 0.7 z_2, neuroticism 0.5 (1 - e) + 0.5 z_3)."""
    out = np.stack([0.6 * e + 0.4 * z[:, 0], 0.3 * (1 - e) + 0.7 * z[:, 2], e, z[:, 1],
                    0.5 * (1 - e) + 0.5 * z[:, 3]], axis=1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def generate_bigfive(seed: int = 0, scale: float = 1.0, personality_signal: str = "weak") -> dict[str, BigFiveSplit]:
    """A Big Five corpus in memory (see `synthesize_bigfive`). Speakers are split-disjoint."""
    signal = _signal(personality_signal)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"synth: scale must be a finite number > 0, got {scale}")
    out: dict[str, BigFiveSplit] = {}
    first = 0
    for s_idx, split in enumerate(SPLITS):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _BIGFIVE_KEY, s_idx + 1]))
        n = scaled_size(BIGFIVE_SPLIT_SIZES[s_idx], scale, 2)
        counts = _clip_counts(n, scaled_size(BIGFIVE_SPLIT_SPEAKERS[s_idx], scale, 1), rng)
        e_spk = rng.beta(_BETA_E, _BETA_E, len(counts))  # the sentiment corpora's personality prior
        z_spk = rng.beta(2.0, 2.0, (len(counts), 4))
        of = np.repeat(np.arange(len(counts)), counts)
        e, z = e_spk[of], z_spk[of]
        t = rng.standard_normal(n) + _AGREEABLE_SHIFT * (2 * z[:, 1] - 1)
        styles = signal.speaker_styles(len(counts), np.random.default_rng(
            np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _BIGFIVE_KEY, s_idx + 1, _STREAMS["idiolect"]])))
        text = [_transcript(float(t[i]), float(e[i]), rng, signal, styles[of[i]]) for i in range(n)]
        speakers = [f"speaker_{first + k + 1:05d}" for k in of]
        clips = np.concatenate([np.arange(c) for c in counts])
        out[split] = BigFiveSplit(ids=[f"{s}$_${c + 1}" for s, c in zip(speakers, clips)], speakers=speakers,
                                  text=text, traits=bigfive_traits(e, z))
        first += len(counts)
    return out


def synthesize_bigfive(out_dir: str | os.PathLike, fmt: str = "csv", seed: int = 0, scale: float = 1.0,
                       personality_signal: str = "weak") -> dict[str, Path]:
    """Write a seeded Big Five corpus: ``bigfive.csv`` or ``bigfive.parquet`` under `out_dir`, columns
    ``id, split, speaker, text`` and the five `BIGFIVE_TRAITS` (float, [0, 1]).

    The same generative story as the sentiment corpora, from the personality side: each speaker draws the
    expressiveness ``e_v ~ Beta(0.6, 0.6)`` that the sentiment corpora plant (their gate g_v = 0.2 + 1.6 e_v), and
    every transcript is written by the same `_transcript` (same lexicon, ``Poisson(2.5 e_v)`` expressive and
    ``Poisson(2.5 (1 - e_v))`` reserved style words; with ``personality_signal="strong"`` the strong signal's, which
    must then be the sentiment corpora's signal too), so an encoder that learns to read extraversion here reads
    e_v in MOSI/MOSEI/SIMS transcripts. The speakers are new ones drawn from the same prior, not the sentiment
    corpora's (pretraining on them would leak the test speakers' personality). See `bigfive_traits` for the other
    four traits. Sizes: ``max(2, round(n * scale))`` clips per split (6000 / 2000 / 2000 at scale 1, as ChaLearn)
    over ``round(speakers * scale)`` speakers (1200 / 400 / 400). Same arguments => identical bytes; atomic write.
    """
    if fmt not in BIGFIVE_FORMATS:
        raise ValueError(f"synth: --kind bigfive writes {' or '.join(BIGFIVE_FORMATS)}, not {fmt!r}")
    splits = generate_bigfive(seed, scale, personality_signal)
    cols: dict[str, list[Any]] = {"id": [], "split": [], "speaker": [], "text": []}
    cols.update({t: [] for t in BIGFIVE_TRAITS})
    for split, s in splits.items():
        cols["id"] += s.ids
        cols["split"] += [split] * len(s)
        cols["speaker"] += s.speakers
        cols["text"] += s.text
        for j, t in enumerate(BIGFIVE_TRAITS):
            cols[t] += s.traits[:, j].tolist()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bigfive.{fmt}"
    if fmt == "csv":
        header = list(cols)
        rows = [[str(v) if k not in BIGFIVE_TRAITS else _fmt_float(v) for k, v in zip(header, r)]
                for r in zip(*cols.values())]
        _atomic_write_bytes(path, _csv_bytes(header, rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: pa.array(v, pa.float32() if k in BIGFIVE_TRAITS else pa.string())
                          for k, v in cols.items()})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        _atomic_write_bytes(path, buf.getvalue().to_pybytes())
    return {"corpus": path}


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
