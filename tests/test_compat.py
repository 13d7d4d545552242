"""Reference-checkpoint conversion: keys, reasons, shape errors, and identical predictions.

`reference_forward` below is an independent transcription of what the reference code computes
(docs/paper-vs-code.md §3) working directly on a reference-keyed state dict with stock
Hugging Face / PyTorch modules; psamf must reproduce its predictions after conversion.
"""

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertLayer

from psamf.compat import load_reference_checkpoint
from psamf.config import Config
from psamf.model import build_model, model_inputs
from tests.helpers import make_batch

torch.set_num_threads(1)
# every state-dict key of a full-size reference checkpoint with its shape (data, not prose)
KEYS_TSV = Path(__file__).resolve().parent / "fixtures" / "reference-checkpoint-keys.tsv"


def _tsv():
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines()[1:] if line.strip()]
    return [(k, tuple(int(x) for x in s.strip("()").split(",") if x.strip())) for k, s in rows]


def test_full_size_reference_keys_convert_completely():
    with torch.device("meta"):
        model = build_model(Config.from_preset("reference").model)
        ref = {k: torch.empty(shape) for k, shape in _tsv()}
    from psamf.compat import convert_reference_state_dict

    converted, report = convert_reference_state_dict(ref, model)
    assert report.missing == []
    assert len(converted) == len(model.state_dict())
    reasons = list(report.dropped.values())
    assert sum("vanilla BERT" in r for r in reasons) == sum(k.startswith("text_enc.") for k in ref)
    assert sum("pooler" in r for r in reasons) == 4  # ss_text_enc and p_text_enc poolers, weight + bias
    assert sum(r.startswith("r_a") for r in reasons) == 2
    assert converted["mm_layers.0.attention.self.query.weight"].shape == (768, 768)
    assert "token_v.weight" in converted and "clip_ta.x_learn_weight.weight" in converted


# tiny stand-ins for the reference geometry: every dimension of the TSV mapped to a small one
DIMS = {768: 32, 3072: 48, 30522: 512, 512: 64, 2: 2, 64: 16, 256: 64, 192: 48, 128: 24, 2048: 40,
        4160: 96, 190: 38, 20: 20, 5: 5, 1: 1, 3: 3}
TEXT_LAYERS = 2


# the reference geometry at the tiny sizes above, as `section.key=value` overrides of the `tiny` preset
TINY_REFERENCE_OVERRIDES = [
    "model.hidden_size=32", "model.intermediate_size=48", "model.num_attention_heads=2",
    f"model.text_layers={TEXT_LAYERS}", "model.multimodal_layers=1", f"model.align_layer={TEXT_LAYERS - 1}",
    "model.personality_layers=2", "model.lstm_hidden=16", "model.av_dim=16", "model.align_dim=16",
    "model.clip_dim=24", "model.fusion_dim=24", "model.head_hidden=24", "model.serial_dim=40",
    "model.cross_key_padding_mask=false", "model.cross_pad_to=500", "model.cross_block=bare",
    "model.personality_tokens=true", "model.prefusion_input=sequence", "model.separate_queries=false",
    "model.clip_norm=reference", "model.clip_logit_scale=2.6593", "model.max_position_embeddings=64",
    "model.hidden_dropout=0.0", "model.attention_dropout=0.0", "model.head_dropout=0.0",
]


def _tiny_reference_cfg():
    return Config.from_preset("tiny").override(TINY_REFERENCE_OVERRIDES)


def _random_reference_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in _tsv():
        m = __import__("re").search(r"encoder\.layer\.(\d+)\.", key)
        if m and int(m.group(1)) >= (TEXT_LAYERS if key.startswith("ss_") else 2):
            continue  # fewer layers in the tiny stand-in (personality: 2, text: TEXT_LAYERS)
        small = tuple(DIMS[d] for d in shape)
        t = torch.randn(small, generator=g) * 0.2
        if "LayerNorm.weight" in key or key == "layer_norm.weight":
            t = 1 + 0.1 * t
        sd[key] = t
    return sd


def _bert(sd, prefix, layers):
    cfg = BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    bert = BertModel(cfg, add_pooling_layer=True)
    bert.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)
                          and ".layer2." not in k and ".hus." not in k and ".clip_t" not in k})
    return bert.eval()


def reference_forward(sd, batch):
    """What the reference code computes (docs/paper-vs-code.md §3), from its own state-dict keys."""
    B = batch["input_ids"].shape[0]

    def lin(name, x):
        return x @ sd[f"{name}.weight"].t() + sd[f"{name}.bias"]

    def lstm(prefix, x, lengths):
        rnn = nn.LSTM(x.shape[-1], 16)
        rnn.load_state_dict({k[len(prefix) + 5:]: v for k, v in sd.items() if k.startswith(prefix + ".rnn.")})
        packed = nn.utils.rnn.pack_padded_sequence(x.transpose(0, 1), lengths, enforce_sorted=False)
        out, (h, _) = rnn(packed)
        seq, _ = nn.utils.rnn.pad_packed_sequence(out, total_length=500)  # re-padded to 500 steps
        return lin(f"{prefix}.linear_1", h.squeeze(0)), seq  # (B,16), (500,B,16)

    h_v, s_v = lstm("visual_enc", batch["visual"], batch["visual_lengths"])
    h_a, s_a = lstm("acoustic_enc", batch["audio"], batch["audio_lengths"])
    cls_p = _bert(sd, "p_text_enc.bertmodel.", 2)(input_ids=batch["p_input_ids"],
                                                  attention_mask=batch["p_attention_mask"]).last_hidden_state[:, 0]
    states = _bert(sd, "ss_text_enc.bertmodel.", TEXT_LAYERS)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
    enc = "ss_text_enc.bertmodel.encoder"
    a_tok = torch.relu(lin(f"{enc}.hus.linear_a.0", h_a) + cls_p)
    v_tok = torch.relu(lin(f"{enc}.hus.linear_v.0", h_v) + cls_p)
    layer2 = BertLayer(BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=48,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    layer2.load_state_dict({k[len(enc) + 10:]: v for k, v in sd.items() if k.startswith(f"{enc}.layer2.0.")})
    x = torch.cat([states[-1], v_tok[:, None], a_tok[:, None]], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones(B, 2, dtype=torch.long)], dim=1)
    ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    h12 = layer2.eval()(x, attention_mask=ext)
    h12 = h12[0] if isinstance(h12, tuple) else h12
    m_s = lin("r_v", h12[:, 0])

    def mha(name, kv):
        att = nn.MultiheadAttention(16, 2)
        att.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")})
        return att(m_s[None], kv, kv)[0][0]

    v_t, a_t = mha("attention_v", s_v), mha("attention_a", s_a)
    serial = torch.cat([lin("v_dim_v", v_t), lin("a_dim_v", a_t), m_s], dim=-1)
    serial = nn.functional.layer_norm(serial, (96,), sd["layer_norm.weight"], sd["layer_norm.bias"])
    f_s = lin("ys", serial)
    f_p = nn.functional.conv1d(torch.stack([v_t, a_t, m_s], 1), sd["cnn.weight"], sd["cnn.bias"]).squeeze(1)
    h = torch.tanh(lin("fusion_prj.linear_1", torch.cat([f_p, f_s], -1)))
    return lin("fusion_prj.linear_3", torch.tanh(lin("fusion_prj.linear_2", h))).squeeze(-1)


def test_reference_checkpoint_gives_the_same_predictions(tmp_path):
    cfg = _tiny_reference_cfg()
    sd = _random_reference_state_dict()
    path = tmp_path / "reference.pt"
    torch.save(sd, path)
    model = build_model(cfg.model).eval()
    report = load_reference_checkpoint(model, path)
    assert report.missing == [] and report.loaded
    assert all("text_enc." not in k or k.startswith(("ss_", "p_")) for k in report.loaded)
    batch = make_batch(cfg.model, B=5, L=12, T_a=9, T_v=11, seed=3)
    with torch.no_grad():
        expected = reference_forward(sd, batch)
        got = model(**model_inputs(batch)).prediction
    assert expected.abs().max() > 1e-3  # a non-trivial prediction
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)


def test_shape_mismatch_is_a_clear_error(tmp_path):
    cfg = _tiny_reference_cfg()
    sd = _random_reference_state_dict()
    sd["visual_enc.rnn.weight_ih_l0"] = torch.zeros(64, 35)  # MOSEI visual width into a MOSI model
    model = build_model(cfg.model)
    with pytest.raises(ValueError, match=r"visual_enc\.rnn\.weight_ih_l0.*\(64, 35\).*\(64, 20\)"):
        load_reference_checkpoint(model, sd)
    path = tmp_path / "mosei_model.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"mosei_model\.pt: reference checkpoint does not fit"):
        load_reference_checkpoint(build_model(cfg.model), path)


def test_missing_keys_and_pickled_modules_are_refused(tmp_path):
    cfg = _tiny_reference_cfg()
    sd = _random_reference_state_dict()
    del sd["cnn.weight"]
    with pytest.raises(ValueError, match="cnn.weight"):
        load_reference_checkpoint(build_model(cfg.model), sd)
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), path)  # the reference's own torch.save(model) pickles classes
    with pytest.raises(ValueError, match="state_dict"):
        load_reference_checkpoint(build_model(cfg.model), path)


def test_precomputed_personality_model_reports_the_dropped_personality_bert():
    cfg = _tiny_reference_cfg()
    model = build_model(cfg.model, with_personality_encoder=False)
    report = load_reference_checkpoint(model, _random_reference_state_dict())
    assert any(k.startswith("p_text_enc.") and "precomputed" in r for k, r in report.dropped.items())


# ---------------------------------------------------------------------------------------- the loader, tightened
def test_every_reference_key_maps_back_to_its_own_name():
    from psamf.compat import reference_key, rename_reference_key

    keys = [k for k, _ in _tsv()]
    assert all(reference_key(rename_reference_key(k)) == k for k in keys)
    assert reference_key("mm_layers.0.output.dense.bias") == "ss_text_enc.bertmodel.encoder.layer2.0.output.dense.bias"


def test_unknown_keys_fail_under_strict_and_are_reported_drops_otherwise():
    from psamf.compat import ReferenceCheckpointError

    cfg = _tiny_reference_cfg()
    sd = _random_reference_state_dict()
    sd["fusion_prj.linear_4.weight"] = torch.zeros(1, 24)  # maps to nothing in psamf
    sd["ss_text_enc.bertmodel.embeddings.position_ids"] = torch.arange(64)[None]  # older transformers: dropped
    with pytest.raises(ReferenceCheckpointError, match=r"map to no parameter.*fusion_prj\.linear_4\.weight") as e:
        load_reference_checkpoint(build_model(cfg.model), sd)
    assert "position_ids" not in str(e.value)
    report = load_reference_checkpoint(build_model(cfg.model), sd, strict=False)
    assert report.unknown == ["fusion_prj.linear_4.weight"]
    assert "unknown: fusion_prj.linear_4.weight" in report.summary()
    assert "position_ids" in report.dropped["ss_text_enc.bertmodel.embeddings.position_ids"]


def test_a_missing_key_is_named_as_in_the_reference_file():
    from psamf.compat import ReferenceCheckpointError

    cfg = _tiny_reference_cfg()
    sd = _random_reference_state_dict()
    del sd["ss_text_enc.bertmodel.encoder.hus.linear_v.0.weight"]  # psamf: token_v.weight
    with pytest.raises(ReferenceCheckpointError, match=r"lacks 1 parameter.*hus\.linear_v\.0\.weight") as e:
        load_reference_checkpoint(build_model(cfg.model), sd)
    assert "token_v" not in str(e.value)
    report = load_reference_checkpoint(build_model(cfg.model), sd, strict=False)
    assert report.missing == ["ss_text_enc.bertmodel.encoder.hus.linear_v.0.weight"]
    assert "(psamf token_v.weight)" in report.summary()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_state_dict_is_upcast_with_a_warning(dtype):
    cfg = _tiny_reference_cfg()
    sd = {k: v.to(dtype) for k, v in _random_reference_state_dict().items()}
    model = build_model(cfg.model).eval()
    with pytest.warns(UserWarning, match=f"half-precision.*{str(dtype)[6:]}.*upcast to float32"):
        report = load_reference_checkpoint(model, sd)
    assert len(report.upcast) == len(sd) - sum(k.startswith("text_enc.") or ".pooler." in k or k.startswith("r_a.")
                                               for k in sd)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    batch = make_batch(cfg.model, B=3, L=10, T_a=7, T_v=8, seed=1)
    with torch.no_grad():
        expected = reference_forward({k: v.float() for k, v in sd.items()}, batch)
        got = model(**model_inputs(batch)).prediction
    assert torch.allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------- psamf convert
def _saved(tmp_path, form: str, sd):
    if form == "module":
        obj = {f"module.{k}": v for k, v in sd.items()}  # saved from a DataParallel model
    elif form == "wrapped":
        obj = {"state_dict": sd, "epoch": 7}
    else:
        obj = sd
    path = tmp_path / f"ref-{form}.pt"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("form", ["bare", "module", "wrapped"])
def test_convert_round_trips_a_reference_state_dict(tmp_path, capsys, form):
    """psamf convert writes a checkpoint directory that load_model (and so evaluate) takes as it is: every
    parameter equals the reference tensor of the same (reference) name, predictions equal the reference's."""
    import json

    import pyarrow.fs as pafs

    from psamf.checkpoint import load_model, verify_checkpoint
    from psamf.cli import main
    from psamf.compat import reference_key
    from psamf.evaluate import worker_count_note

    sd = _random_reference_state_dict(seed=4)
    out = tmp_path / "converted"
    assert main(["convert", str(_saved(tmp_path, form, sd)), str(out), "--preset", "tiny",
                 *TINY_REFERENCE_OVERRIDES]) == 0
    printed = capsys.readouterr().out
    assert "loaded" in printed and "missing 0" in printed and "vanilla BERT" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "meta.json", "model.pt"]
    assert verify_checkpoint(pafs.LocalFileSystem(), str(out)) == []
    assert json.loads((out / "meta.json").read_text())["converted_from"].endswith(f"ref-{form}.pt")
    model, cfg = load_model(str(out))
    # never validated by a psamf run: evaluating it on any worker count says nothing about "the run's" workers
    assert cfg.run.num_workers != 1 and worker_count_note(str(out), cfg, 1) is None
    state = model.state_dict()
    assert all(torch.equal(v, sd[reference_key(k)]) for k, v in state.items())
    batch = make_batch(cfg.model, B=4, L=10, T_a=7, T_v=9, seed=2)
    with torch.no_grad():
        assert torch.allclose(model(**model_inputs(batch)).prediction, reference_forward(sd, batch), atol=1e-5)


def test_convert_refuses_a_truncated_file_an_unknown_key_and_an_existing_directory(tmp_path, capsys):
    from psamf.cli import main

    args = ["--preset", "tiny", *TINY_REFERENCE_OVERRIDES]
    sd = _random_reference_state_dict()
    path = _saved(tmp_path, "bare", sd)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["convert", str(truncated), str(tmp_path / "a"), *args]) == 2
    err = capsys.readouterr().err
    assert f"{truncated}: not a loadable state dict, truncated or corrupt?" in err

    sd["ss_text_enc.bertmodel.encoder.layer2.1.output.dense.bias"] = torch.zeros(32)  # a 2nd multimodal layer
    assert main(["convert", str(_saved(tmp_path, "wrapped", sd)), str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err
    assert "ref-wrapped.pt" in err and "ss_text_enc.bertmodel.encoder.layer2.1.output.dense.bias" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging directory left

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    assert main(["convert", str(path), str(tmp_path / "c"), *args]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["notes.txt"]
    (tmp_path / "f").write_text("")  # a file where the directory (or its parent) should be: no traceback
    assert main(["convert", str(path), str(tmp_path / "f"), *args]) == 2
    assert "f is a file; a checkpoint is a directory" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "f" / "sub"), *args]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.integration
def test_convert_reads_and_writes_s3(tmp_path, s3_bucket, capsys):
    import boto3

    from psamf.checkpoint import load_model
    from psamf.cli import main
    from psamf.compat import reference_key
    from tests.conftest import S3_ENDPOINT

    sd = _random_reference_state_dict(seed=5)
    boto3.client("s3", endpoint_url=S3_ENDPOINT, region_name="us-east-1").upload_file(
        str(_saved(tmp_path, "module", sd)), s3_bucket, "ref/psamf_ref.pt")
    out = f"s3://{s3_bucket}/converted/mosi"
    assert main(["convert", f"s3://{s3_bucket}/ref/psamf_ref.pt", out, "--preset", "tiny",
                 *TINY_REFERENCE_OVERRIDES]) == 0
    assert "missing 0" in capsys.readouterr().out
    model, _ = load_model(out)
    assert all(torch.equal(v, sd[reference_key(k)]) for k, v in model.state_dict().items())
