"""The registry of corpora psamf knows: one place for what each data set is.

Every module that needs a fact about a corpus reads it here: `DataConfig.dataset` validates against
`NAMES`, `psamf prepare --dataset` offers them, the source readers take MMSA directory names, label ranges
and the dims-to-name guess from here, the metrics pick their family (regression for CMU-MOSI/MOSEI and
custom data, the SIMS bins for CH-SIMS / SIMS v2), and `psamf.synth` sizes its imitations from the split
sizes. Facts come from the public releases (docs/data-formats.md).

To add a corpus: add its name to `DatasetName` and a `Corpus` to `CORPORA`; nothing else has a list.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

__all__ = ["DatasetName", "NAMES", "Corpus", "CORPORA", "get", "names_in_family", "name_for_feature_dims",
           "DEFAULT_LABEL_RANGE"]

# The choice `DataConfig.dataset` is validated against (a Literal, so the YAML loader names the choices).
DatasetName = Literal["mosi", "mosei", "sims", "simsv2", "custom"]
NAMES: tuple[str, ...] = typing.get_args(DatasetName)

MetricFamily = Literal["regression", "sims"]
DEFAULT_LABEL_RANGE = (-3.0, 3.0)  # custom data without its own range: the CMU convention


@dataclass(frozen=True)
class Corpus:
    """What psamf knows about one corpus.

    feature_dims:  (audio, visual) widths of the MMSA release, or None (custom: from the data)
    label_range:   (low, high) of the regression label
    metric_family: "regression" (MOSI/MOSEI metrics) or "sims" (CH-SIMS bins)
    split_sizes:   (train, valid, test) utterances of the release, or None
    mmsa_dir:      the release's directory in MMSA's layout (`<dir>/Processed/*.pkl`), or None
    synth_kind:    the `psamf.synth` kind imitating it, or None
    """

    name: str
    feature_dims: tuple[int, int] | None
    label_range: tuple[float, float]
    metric_family: MetricFamily
    split_sizes: tuple[int, int, int] | None
    mmsa_dir: str | None
    synth_kind: str | None


CORPORA: dict[str, Corpus] = {
    "mosi": Corpus("mosi", (5, 20), (-3.0, 3.0), "regression", (1284, 229, 686), "MOSI", "mosi"),
    "mosei": Corpus("mosei", (74, 35), (-3.0, 3.0), "regression", (16326, 1871, 4659), "MOSEI", "mosei"),
    "sims": Corpus("sims", (33, 709), (-1.0, 1.0), "sims", (1368, 456, 457), "SIMS", "sims"),
    # SIMS v2 dims as in MMSA's config ([768, 25, 177])
    "simsv2": Corpus("simsv2", (25, 177), (-1.0, 1.0), "sims", (2722, 647, 1034), "SIMSv2", "simsv2"),
    "custom": Corpus("custom", None, DEFAULT_LABEL_RANGE, "regression", None, None, None),
}
assert tuple(CORPORA) == NAMES, "DatasetName and CORPORA must list the same corpora in the same order"


def get(name: str) -> Corpus:
    """The registry entry of `name`; a ValueError listing the known names otherwise."""
    try:
        return CORPORA[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(NAMES)}") from None


def names_in_family(family: MetricFamily) -> tuple[str, ...]:
    """The corpora scored with one metric family, in registry order."""
    return tuple(c.name for c in CORPORA.values() if c.metric_family == family)


def name_for_feature_dims(dims: tuple[int, int]) -> str | None:
    """The corpus whose release has these (audio, visual) widths, or None."""
    for c in CORPORA.values():
        if c.feature_dims == tuple(dims):
            return c.name
    return None
