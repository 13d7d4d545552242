"""Every shipped job config loads into the dataclasses.

Walks jobs/configs/ **recursively** (a non-recursive walk misses configs in subfolders) and loads each file
with `Config.from_yaml`, where unknown keys, wrong types and inconsistent values are errors: a config that
drifts from psamf/config.py fails here, not on the cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from psamf.config import PRESETS, Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]
JOB_CONFIGS = ROOT / "jobs" / "configs"

ALL_FILES = sorted(p for p in JOB_CONFIGS.rglob("*") if p.is_file())
CONFIG_FILES = [p for p in ALL_FILES if p.suffix in (".yaml", ".yml")]


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_expected_configs_present():
    names = {p.relative_to(JOB_CONFIGS).as_posix() for p in CONFIG_FILES}
    assert {"tiny-synth.yaml", "mosi-reference.yaml", "mosei-reference.yaml", "mosi-paper.yaml"} <= names


def test_only_yaml_files_under_configs():
    # a config saved as .yml.bak or .json would silently escape the validation below
    others = [_rel(p) for p in ALL_FILES if p.suffix not in (".yaml", ".yml") and p.name != "README.md"]
    assert not others, f"non-YAML files under jobs/configs: {others}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_rel)
def test_config_loads(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw.get("preset") in PRESETS, \
        f"{_rel(path)}: name one of the presets {sorted(PRESETS)} explicitly"
    cfg = Config.from_yaml(path)
    assert cfg.preset == raw["preset"]
    # the CLI's `--run-name` and key=value overrides apply cleanly on top
    cfg2 = cfg.override(["run.name=ci-check", "optim.seed=1111"])
    assert cfg2.run.name == "ci-check" and cfg2.optim.seed == 1111
    # and the resolved config round-trips through YAML (it is saved with every run)
    assert Config.from_dict(yaml.safe_load(cfg.to_yaml())).to_dict() == cfg.to_dict()


def test_cluster_configs_use_gpu_and_object_storage():
    for name in ("mosi-reference.yaml", "mosei-reference.yaml", "mosi-paper.yaml"):
        cfg = Config.from_yaml(JOB_CONFIGS / name)
        assert cfg.run.use_gpu and cfg.run.num_workers >= 1, name
        # multi-node clusters reject a local storage_path (docs/ray-operations.md §5)
        assert cfg.run.storage_path.startswith(("s3://", "gs://")), name
        assert cfg.data.uri.startswith(("s3://", "gs://")), name
        assert cfg.model.text_model, f"{name}: cluster runs load real BERT weights"
    assert Config.from_yaml(JOB_CONFIGS / "mosei-reference.yaml").data.dataset == "mosei"
    tiny = Config.from_yaml(JOB_CONFIGS / "tiny-synth.yaml")
    assert tiny.preset == "tiny" and not tiny.run.use_gpu


def test_unknown_key_is_an_error(tmp_path):
    # the property the walk above relies on: drift is caught, not ignored
    bad = tmp_path / "drift.yaml"
    bad.write_text("preset: tiny\nrun:\n  num_worker: 2\n")
    with pytest.raises(ConfigError, match=r"run\.num_worker"):
        Config.from_yaml(bad)
