import os
import re

import pytest
import yaml

from psamf.config import ABLATIONS, Config, ConfigError, ablate


@pytest.mark.parametrize("name", Config.preset_names())
def test_preset_yaml_round_trip(name, tmp_path):
    cfg = Config.from_preset(name)
    path = tmp_path / f"{name}.yaml"
    cfg.to_yaml(path)
    again = Config.from_yaml(path)
    assert again == cfg
    assert again.preset == name


def test_presets_differ_where_the_reference_and_paper_differ():
    ref, paper = Config.from_preset("reference"), Config.from_preset("paper")
    assert (ref.model.text_layers, ref.model.multimodal_layers, ref.model.align_layer) == (11, 1, 10)
    assert ref.model.multimodal_init == "random" and paper.model.multimodal_init == "pretrained"
    assert ref.model.sim_mode == "batch_dissimilarity" and paper.model.sim_mode == "per_sample_dissimilarity"
    assert ref.model.clip_logit_scale == pytest.approx(2.6593, abs=1e-4)
    assert (ref.loss.w_l1, ref.loss.w_ccl, ref.loss.w_ps, ref.loss.w_clm) == (1.0, 1.0, 0.1, 0.09)
    assert (paper.loss.w_ps, paper.loss.w_clm) == (1.0, 1.0)
    assert ref.model.personality_tokens and not ref.model.cross_key_padding_mask
    assert paper.model.cross_block == "transformer" and ref.model.cross_block == "bare"
    tiny = Config.from_preset("tiny")
    assert 2 <= tiny.model.bert_layers <= 4 and tiny.model.hidden_size <= 64


def test_length_grouped_batches_are_the_default_except_in_the_reference_presets():
    """Padding-free batches by default (docs/benchmarks.md, "Length grouping"); the reference presets keep the
    reference code's uniformly shuffled batches."""
    for name in ("tiny", "paper"):
        d = Config.from_preset(name).data
        assert d.length_grouping and d.length_noise == pytest.approx(0.05), name
    for name in ("reference", "reference-mosei"):
        assert not Config.from_preset(name).data.length_grouping, name
    for bad in ("-0.1", "1.0"):
        with pytest.raises(ConfigError, match=r"data\.length_noise must be in \[0, 1\)"):
            Config.from_preset("tiny").override([f"data.length_noise={bad}"])


def test_partial_yaml_starts_from_its_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"preset": "tiny", "optim": {"lr_main": "1e-4", "epochs": 3}}))
    cfg = Config.from_yaml(p)
    assert cfg.optim.lr_main == 1e-4 and cfg.optim.epochs == 3
    assert cfg.model.hidden_size == Config.from_preset("tiny").model.hidden_size


@pytest.mark.parametrize("doc, fragment", [
    ({"modle": {}}, "unknown top-level key"),
    ({"model": {"hiden_size": 8}}, "model.hiden_size"),
    ({"model": {"hidden_size": "big"}}, "model.hidden_size must be int"),
    ({"model": {"sim_mode": "cosine"}}, "model.sim_mode must be one of"),
    ({"preset": "huge"}, "unknown preset"),
    ({"optim": {"batch_size": 1}}, "optim.batch_size"),
    ({"optim": {"select_metric": "test_mae"}}, "never selected on test"),
    ({"loss": {"w_ps": -1}}, "loss.w_ps"),
])
def test_yaml_errors_name_the_field(tmp_path, doc, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        Config.from_yaml(p)


@pytest.mark.parametrize("overrides, fragment", [
    (["model.align_layer=5"], "alignment beyond the text layers"),
    (["model.hidden_size=33"], "must divide into model.num_attention_heads"),
    (["model.av_dim=15"], "must divide into model.cross_heads"),
    (["model.use_prefusion=false"], "use_clm_loss=true needs model.use_prefusion"),
    (["model.use_personality=false"], "personality_tokens=true needs model.use_personality"),
    (["model.multimodal_layers=0"], "multimodal_layers >= 1"),
    (["model.hidden_dropout=1.5"], "hidden_dropout"),
    (["modelx.a=1"], "section"),
    (["model.nope=1"], "unknown key 'model.nope'"),
    (["model.text_layers"], "section.key=value"),
    (["data.max_text_len=2"], "data.max_text_len must be in [3, 512] ([CLS], at least one token, [SEP])"),
])
def test_impossible_combinations_are_rejected(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Config.from_preset("tiny").override(overrides)


def test_overrides_parse_yaml_scalars():
    cfg = Config.from_preset("tiny").override(["optim.lr_bert=2e-5", "model.cross_pad_to=null",
                                               "run.use_gpu=true", "data.uri=s3://b/x"])
    assert cfg.optim.lr_bert == 2e-5 and cfg.model.cross_pad_to is None
    assert cfg.run.use_gpu is True and cfg.data.uri == "s3://b/x"


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_gives_a_valid_config(name):
    cfg = ablate(Config.from_preset("reference"), name)
    for k, v in ABLATIONS[name].items():
        assert getattr(cfg.model, k) == v


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(bad)


def test_yaml_boolean_words_map_onto_literal_choices(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: tiny\noptim:\n  amp: off\n")  # YAML 1.1 reads `off` as False
    assert Config.from_yaml(p).optim.amp == "off"
    assert Config.from_preset("tiny").override(["optim.amp=off"]).optim.amp == "off"
    with pytest.raises(ConfigError, match="optim.amp"):
        Config.from_preset("tiny").override(["optim.amp=on"])


def test_replace_takes_dotted_and_nested_keys_and_validates_like_yaml():
    cfg = Config.from_preset("tiny")
    new = cfg.replace({"optim.lr_main": 2e-4, "model": {"head_dropout": 0.25}, "run": {"name": "x"}})
    assert (new.optim.lr_main, new.model.head_dropout, new.run.name) == (2e-4, 0.25, "x")
    assert cfg.optim.lr_main != 2e-4  # a copy
    with pytest.raises(ConfigError, match="optim.nope"):
        cfg.replace({"optim.nope": 1}, source="search.yaml")
    with pytest.raises(ConfigError, match="search.yaml"):
        cfg.replace({"optim": {"lr_main": "fast"}}, source="search.yaml")
    with pytest.raises(ConfigError, match="<section>.<field>"):
        cfg.replace({"lr_main": 1.0})


def test_worker_resources_and_elastic_workers_reach_ray_trains_scaling_config():
    cfg = Config.from_preset("tiny").override(["run.worker_resources={accel: 1}", "run.num_workers=2"])
    assert cfg.run.worker_resources == {"accel": 1.0}
    kw = cfg.run.scaling_kwargs()
    assert kw == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1.0, "accel": 1.0}}
    el = cfg.replace({"run.min_workers": 1, "run.elastic_resize_interval_s": 5}).run.scaling_kwargs()
    assert el["num_workers"] == (1, 2) and el["elastic_resize_monitor_interval_s"] == 5.0
    assert cfg.replace({"run.min_workers": 2}).run.scaling_kwargs()["num_workers"] == 2  # min = max: fixed
    gpu = cfg.replace({"run.use_gpu": True, "run.gpus_per_worker": 0.5}).run.resources_per_worker()
    assert gpu == {"CPU": 1.0, "GPU": 0.5, "accel": 1.0}


@pytest.mark.parametrize("override, fragment", [
    ("run.worker_resources={GPU: 1}", "not a custom resource"),
    ("run.worker_resources={accel: 0}", "run.worker_resources.accel must be > 0"),
    ("run.worker_resources=[accel]", "run.worker_resources must be a mapping of str to float"),
    ("run.worker_resources={accel: fast}", "run.worker_resources must be a mapping"),
    ("run.min_workers=3", "run.min_workers must be in [0, run.num_workers=2]"),
    ("run.controller_poll_s=0", "run.controller_poll_s must be in (0, 60] seconds, got 0"),
    ("run.controller_poll_s=120", "run.controller_poll_s must be in (0, 60] seconds, got 120"),
    ("run.controller_failure_limit=-2", "run.controller_failure_limit must be >= -1 (-1 = retry forever)"),
])
def test_bad_worker_resources_and_min_workers_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Config.from_preset("tiny").override(["run.num_workers=2", override])


def test_the_controller_poll_interval_is_set_for_the_fit_only_and_a_user_setting_wins(monkeypatch):
    """`runtime.fit_trainer` hands `run.controller_poll_s` to Ray through RAY_TRAIN_HEALTH_CHECK_INTERVAL_S while
    `fit()` runs (Ray reads it there), restores the environment after, also when fit raises, and leaves a value the
    user exported alone. That the workers of a real run see it: tests/test_train_integration.py (metrics.json)."""
    from psamf import runtime

    class Probe:  # stands in for a TorchTrainer: only its fit() is called, and it reads what Ray would read
        def __init__(self, fail: bool = False) -> None:
            self.seen: str | None = None
            self.fail = fail

        def fit(self) -> str:
            self.seen = os.environ.get(runtime.POLL_ENV)
            if self.fail:
                raise RuntimeError("worker failed")
            return "result"

    monkeypatch.delenv(runtime.POLL_ENV, raising=False)
    assert Config.from_preset("tiny").run.controller_poll_s == runtime.DEFAULT_POLL_S == 0.25
    p = Probe()
    assert runtime.fit_trainer(p, 0.5) == "result" and p.seen == "0.5"
    assert runtime.POLL_ENV not in os.environ
    p = Probe(fail=True)
    with pytest.raises(RuntimeError, match="worker failed"):
        runtime.fit_trainer(p, 0.25)
    assert p.seen == "0.25" and runtime.POLL_ENV not in os.environ
    # two fits overlapping in threads: the second sees the first one's value, and the last to end cleans up
    import threading

    inside, release = threading.Event(), threading.Event()

    class Held(Probe):
        def fit(self) -> str:
            inside.set()
            release.wait(10)
            return super().fit()

    held = Held()
    t = threading.Thread(target=runtime.fit_trainer, args=(held, 0.5))
    t.start()
    assert inside.wait(10)
    p = Probe()
    runtime.fit_trainer(p, 0.3)
    assert p.seen == "0.5" and os.environ[runtime.POLL_ENV] == "0.5"  # the held fit is still running
    release.set()
    t.join(10)
    assert held.seen == "0.5" and runtime.POLL_ENV not in os.environ
    monkeypatch.setenv(runtime.POLL_ENV, "1.5")
    p = Probe()
    runtime.fit_trainer(p, 0.25)
    assert p.seen == "1.5" and os.environ[runtime.POLL_ENV] == "1.5" and runtime.poll_interval(0.25) == 1.5
    monkeypatch.setenv(runtime.POLL_ENV, "soon")
    with pytest.raises(ValueError, match="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S='soon' is not a number"):
        runtime.fit_trainer(Probe(), 0.25)


def test_every_ray_train_fit_in_the_package_goes_through_fit_trainer():
    """A `TorchTrainer.fit()` called directly would run with Ray's 2-second poll. Tune's `Tuner.fit()` is the only
    other `fit()` in the package (its trials call `fit_trainer` themselves)."""
    import ast
    from pathlib import Path

    import psamf

    root = Path(psamf.__file__).parent
    direct = []
    for path in sorted(root.rglob("*.py")):
        src = path.read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "fit" \
                    and not node.args and not node.keywords:
                target = ast.get_source_segment(src, node.func.value) or ""
                if path.name != "runtime.py" and "tuner" not in target.lower():
                    direct.append(f"{path.relative_to(root)}:{node.lineno}: {target}.fit()")
    assert direct == [], direct
    assert "fit_trainer(" in (root / "train.py").read_text() + (root / "tune.py").read_text()
