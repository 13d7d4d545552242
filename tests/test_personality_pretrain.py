"""`psamf personality pretrain` on Ray Train (local mode): it beats the untrained encoder, it resumes by name,
and its export is a personality encoder that `psamf prepare --personality-model` and `model.personality_model`
take as they are."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from psamf import personality as P

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pretrained(ray_cluster, tmp_path_factory):
    """One pretraining run on a small synthetic Big Five corpus (tiny config, local mode) through the CLI.

    The corpus plants the strong personality signal (`psamf.synth.SIGNALS`): dense enough that two epochs over
    600 clips teach the tiny encoder e_v (measured: extraversion r ≈ 0.87 after one epoch at scale 0.3), where the
    weak signal needed more epochs for a smaller lift; this fixture used to take 143 s under load."""
    from psamf.cli import main
    from psamf.synth import synthesize_bigfive

    root = tmp_path_factory.mktemp("persona")
    corpus = synthesize_bigfive(root / "bigfive", "parquet", seed=0, scale=0.1, personality_signal="strong")["corpus"]
    argv = ["personality", "pretrain", "--data", str(corpus), "--model", P.TINY_CONFIG, "--out", str(root / "enc"),
            "--num-workers", "0", "--epochs", "2", "--lr", "1e-3", "--max-len", "32", "--storage-path",
            str(root / "runs"), "--name", "pt"]
    assert main(argv) == 0
    return root, argv


def test_pretraining_raises_mean_trait_r_well_above_the_untrained_encoder(pretrained):
    root, _ = pretrained
    m = json.loads((root / "enc" / P.METRICS_FILE).read_text())
    assert m["split"] == "test" and m["counts"]["test"] == 200 and len(m["history"]) == 2
    for key in ("untrained", "pretrained", "pretrained_ridge"):
        assert set(m[key]["mae"]) == set(m[key]["pearson_r"]) == set(P.TRAITS)
    # the frozen CLS (what PSA-MF reads) of the pretrained encoder carries the traits, the untrained one's much less
    # (measured on this fixture: mean r 0.27 untrained, 0.51 pretrained)
    assert m["pretrained_ridge"]["mean_r"] > m["untrained"]["mean_r"] + 0.15
    assert m["pretrained"]["mean_r"] > m["untrained"]["mean_r"] + 0.15
    # extraversion is e_v, the planted personality (measured: untrained 0.48, pretrained 0.79)
    ext = {k: m[k]["pearson_r"]["extraversion"] for k in ("untrained", "pretrained_ridge")}
    assert ext["pretrained_ridge"] > 0.6 and ext["pretrained_ridge"] > ext["untrained"] + 0.15, ext
    # validation-only selection: the selected epoch is the best val_mean_mae
    hist = m["history"]
    assert m["selected_epoch"] == min(hist, key=lambda r: (r["val_mean_mae"], -r["epoch"]))["epoch"]


def test_rerun_of_the_same_name_resumes_and_a_changed_one_is_refused(pretrained, capsys, monkeypatch, caplog):
    import logging

    from psamf.cli import main

    root, argv = pretrained
    before = json.loads((root / "enc" / P.METRICS_FILE).read_text())
    monkeypatch.chdir(root)  # the same corpus named relative to another directory is the same run
    data = argv[argv.index("--data") + 1]
    relative = [os.path.relpath(data, root) if a == data else a for a in argv]
    with caplog.at_level(logging.INFO, logger="psamf.pretrain"):
        assert main(relative) == 0  # finished run: no further epoch, same selection
    assert "had trained all 2 epochs: nothing to train" in caplog.text
    after = json.loads((root / "enc" / P.METRICS_FILE).read_text())
    assert after["history"] == before["history"] and after["selected_epoch"] == before["selected_epoch"]
    changed = [a if a != "32" else "24" for a in argv]  # --max-len
    assert main(changed) == 2
    assert "was started with other settings" in capsys.readouterr().err
    # the training recipe is part of the run too: another learning rate is refused, naming it
    assert main([a if a != "1e-3" else "5e-4" for a in argv]) == 2
    err = capsys.readouterr().err
    assert "was started with other settings" in err and "lr: 0.001 -> 0.0005" in err
    assert main(argv + ["--weight-decay", "0.1"]) == 2  # the CLI passes it on: part of the recipe too
    assert "weight_decay: 0.01 -> 0.1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --help shows the defaults the run uses
        main(["personality", "pretrain", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "(default 5)" in shown and "AdamW weight decay (default 0.01)" in shown
    # another run may not replace this run's encoder: refused before anything trains
    other = [a if a != "pt" else "pt2" for a in argv]
    assert main(other) == 2
    assert "holds the encoder of pretraining run" in capsys.readouterr().err
    assert not (root / "runs" / "pt2").exists()
    assert json.loads((root / "enc" / P.METRICS_FILE).read_text())["history"] == before["history"]


def test_export_is_accepted_by_prepare_and_by_the_model_config(pretrained, tmp_path):
    from transformers import AutoModel

    from psamf.config import Config
    from psamf.model import build_model
    from psamf.prepare import prepare
    from psamf.synth import synthesize
    from psamf.tokenizers import load_tokenizer

    root, _ = pretrained
    enc_dir = str(root / "enc")
    assert {"config.json", P.METRICS_FILE}.issubset({p.name for p in (root / "enc").iterdir()})
    enc = AutoModel.from_pretrained(enc_dir).eval()
    assert not any("head" in k for k in enc.state_dict())  # the regression head is not exported
    # psamf prepare --personality-model DIR: the shards' CLS is the exported encoder's CLS
    pkl = synthesize("mosi", "mmsa", tmp_path / "mosi", seed=0, scale=0.02)["pickle"]
    cfg = Config.from_preset("tiny").override([f"model.personality_model={enc_dir}"])
    man = prepare({"format": "mmsa", "input": str(pkl), "dataset": "mosi"}, str(tmp_path / "shards"),
                  tokenizer="psamf:tiny", personality_tokenizer=enc_dir, max_text_len=32,
                  personality_model=cfg.model)
    assert man["personality_cls"]["dim"] == 32 and man["personality_cls"]["model"] == enc_dir
    import pyarrow.dataset as pads

    files = sorted(str(f) for f in (tmp_path / "shards").rglob("*.parquet"))
    tbl = pads.dataset(files, format="parquet").to_table(
        columns=["p_input_ids", "p_attention_mask", "p_token_type_ids", "personality_cls"])
    toks = {c: np.stack(tbl.column(f"p_{c}").to_numpy(zero_copy_only=False)).astype(np.int64)
            for c in P.TOKEN_COLUMNS}
    cls = np.stack(tbl.column("personality_cls").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(P.cls_features(enc, toks), cls, atol=1e-4)
    assert load_tokenizer(enc_dir).get_vocab() == load_tokenizer("psamf:tiny").get_vocab()
    # model.personality_model=DIR: PSA-MF builds with the exported encoder as its frozen personality BERT
    model = build_model(cfg.model)
    assert model.personality_dim == 32
    for k, v in enc.state_dict().items():
        if not k.startswith("pooler"):
            assert torch.equal(model.personality_enc.state_dict()[k], v), k

