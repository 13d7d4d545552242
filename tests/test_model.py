"""Unit tests for psamf.model on tiny random BERTs (no downloads, no Ray)."""

import copy

import pytest
import torch
from transformers import BertModel

from psamf.config import ABLATIONS, Config, ablate
from psamf.losses import compute_losses
from psamf.model import (PSAMF, AddNormFFN, CLIPHead, RNNEncoder, SubNet, build_model, build_text_bert, check_inputs,
                         load_personality_encoder, model_inputs, param_groups)
from tests.helpers import make_batch, tiny_cfg

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg()


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg.model)


# ----------------------------------------------------------------------------- modules
def test_rnn_encoder_shapes_and_zero_padding():
    enc = RNNEncoder(5, 8, 6)
    x = torch.randn(3, 7, 5)
    lengths = torch.tensor([7, 2, 4])
    h, seq = enc(x, lengths)
    assert h.shape == (3, 6) and seq.shape == (3, 7, 8)
    assert torch.all(seq[1, 2:] == 0) and torch.all(seq[2, 4:] == 0)
    # the final state of sample 1 depends only on its first 2 frames
    x2 = x.clone()
    x2[1, 2:] = 100.0
    assert torch.allclose(enc(x2, lengths)[0][1], h[1])


def test_clip_head_normalisation_forms():
    x, y = torch.randn(4, 6), torch.randn(4, 5)
    ref = CLIPHead(6, 5, 8, 2.6593, learn_scale=False, norm="reference")
    pair = ref(x, y)
    assert pair.x.shape == pair.y.shape == (4, 8)
    assert torch.allclose(pair.x.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert not torch.allclose(pair.y.norm(dim=-1), torch.ones(4), atol=1e-3)  # reference: y not re-normalised
    assert pair.logit_scale.item() == pytest.approx(2.6593, rel=1e-5)
    sym = CLIPHead(6, 5, 8, 14.2857, learn_scale=True, norm="symmetric")
    pair = sym(x, y)
    assert torch.allclose(pair.y.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert any(n == "log_logit_scale" for n, _ in sym.named_parameters())
    assert "log_logit_scale" not in ref.state_dict()  # fixed scale is not a checkpoint entry


def test_block_and_head_shapes():
    assert AddNormFFN(16, 32, 0.0)(torch.randn(3, 16), torch.randn(3, 16)).shape == (3, 16)
    assert SubNet(38, 24, 0.1)(torch.randn(5, 38)).shape == (5,)


# ----------------------------------------------------------------------------- whole model
def test_full_model_shapes(cfg):
    m = _model(cfg).eval()
    b = make_batch(cfg.model, B=4, L=12)
    out = m(**model_inputs(b))
    mc = cfg.model
    H, L = mc.hidden_size, 12
    assert out.prediction.shape == (4,)
    # embeddings + text layers + multimodal input + multimodal layers
    assert len(out.hidden_states) == 1 + mc.text_layers + 1 + mc.multimodal_layers
    assert all(h.shape == (4, L, H) for h in out.hidden_states[: mc.text_layers + 1])
    assert all(h.shape == (4, L + 2, H) for h in out.hidden_states[mc.text_layers + 1:])
    assert out.cls_personality.shape == (4, H) and out.align_cos.shape == (4,)
    assert out.ccl_pair.x.shape == (4, mc.clip_dim) and out.ps_pred.shape == (4,)
    assert len(out.clm_pairs) == 2
    assert out.fused.shape == (4, mc.av_dim - mc.conv_kernel + 1 + mc.fusion_dim)


def test_reference_geometry_matches_published_parameter_count():
    """docs/paper-vs-code.md §4: sentiment BERT copy 109,975,808 + non-BERT 1,192,844, minus the
    unused pooler (590,592) and r_a (49,216) that psamf does not build."""
    with torch.device("meta"):
        m = build_model(Config.from_preset("reference").model)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == 109_975_808 + 1_192_844 - 590_592 - 49_216
    assert sum(p.numel() for p in m.personality_enc.parameters()) == 109_482_240 - 590_592


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_full_size_presets_build_and_run(preset):
    cfg = Config.from_preset(preset)
    m = _model(cfg).eval()
    b = make_batch(cfg.model, B=2, L=10, T_a=6, T_v=5)
    with torch.no_grad():
        out = m(**model_inputs(b))
    assert out.prediction.shape == (2,) and torch.isfinite(out.prediction).all()


def test_text_states_equal_hf_bert(cfg):
    """The split BERT computes exactly what BertModel computes: states 0..N (text layers), and with
    pre-fusion ablated, the multimodal layers too."""
    mc = ablate(cfg, "no_prefusion").model
    torch.manual_seed(0)
    bert = build_text_bert(mc)
    hf = copy.deepcopy(bert).eval()
    m = PSAMF(mc, bert, load_personality_encoder(mc)).eval()
    b = make_batch(mc, B=3, L=10)
    out = m(**model_inputs(b))
    ref = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
             output_hidden_states=True).hidden_states
    assert len(ref) == len(out.hidden_states)
    for i, (a, r) in enumerate(zip(out.hidden_states, ref)):
        valid = b["attention_mask"].bool()
        assert torch.allclose(a[valid], r[valid], atol=1e-5), f"hidden state {i} differs"


def test_random_multimodal_layer_differs_from_pretrained_layer(cfg):
    torch.manual_seed(0)
    pre = build_model(cfg.override(["model.multimodal_init=pretrained"]).model)
    torch.manual_seed(0)
    rnd = build_model(cfg.model)
    # same text layers, different multimodal layer
    assert torch.equal(pre.text_bert.encoder.layer[0].attention.self.query.weight,
                       rnd.text_bert.encoder.layer[0].attention.self.query.weight)
    assert not torch.equal(pre.mm_layers[0].attention.self.query.weight, rnd.mm_layers[0].attention.self.query.weight)


@pytest.mark.parametrize("variant", ["tiny", "tiny-reference-switches", "tiny-paper-switches"])
def test_gradients_reach_exactly_the_trainable_parameters(variant):
    overrides = {
        "tiny": [],
        "tiny-reference-switches": ["model.cross_key_padding_mask=false", "model.cross_pad_to=20",
                                    "model.personality_dropout=true"],
        "tiny-paper-switches": ["model.multimodal_init=pretrained", "model.sim_mode=per_sample_dissimilarity",
                                "model.clip_norm=symmetric", "model.clip_learn_scale=true",
                                "model.ps_separate_projection=false", "model.personality_tokens=false",
                                "model.prefusion_input=cls", "model.cross_block=transformer",
                                "model.separate_queries=true"],
    }[variant]
    cfg = Config.from_preset("tiny").override(overrides)
    m = _model(cfg).train()
    b = make_batch(cfg.model, B=5)  # odd: the L1 gradient of the head bias (mean of signs) cannot cancel
    terms = compute_losses(m(**model_inputs(b)), b["label"], cfg.loss, cfg.model)
    terms["total"].backward()
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    # padding / type rows of the embedding tables legitimately get no gradient; everything else must
    assert [n for n in no_grad if "embeddings" not in n] == []
    frozen = list(m.personality_enc.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)


def test_personality_encoder_is_frozen_and_dropout_follows_the_switch(cfg):
    m = _model(cfg).train()
    assert not m.personality_enc.training  # personality_dropout=false: always eval
    b = make_batch(cfg.model)
    a = m.personality_cls(b["p_input_ids"], b["p_attention_mask"])
    assert torch.equal(a, m.personality_cls(b["p_input_ids"], b["p_attention_mask"]))
    ref = _model(cfg.override(["model.personality_dropout=true"])).train()
    assert ref.personality_enc.training  # the reference quirk: dropout perturbs CLS_p in training
    assert not torch.equal(ref.personality_cls(b["p_input_ids"], b["p_attention_mask"]),
                           ref.personality_cls(b["p_input_ids"], b["p_attention_mask"]))
    ref.eval()
    assert not ref.personality_enc.training


def test_precomputed_personality_cls_gives_the_same_prediction(cfg):
    m = _model(cfg).eval()
    b = make_batch(cfg.model)
    full = m(**model_inputs(b)).prediction
    cls_p = m.personality_cls(b["p_input_ids"], b["p_attention_mask"], b["p_token_type_ids"])
    pre = {k: v for k, v in model_inputs(b).items() if not k.startswith("p_")}
    assert torch.allclose(m(**pre, personality_cls=cls_p).prediction, full, atol=1e-6)
    # and a model built without the personality BERT runs on the precomputed vector alone
    slim = build_model(cfg.model, with_personality_encoder=False).eval()
    slim.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("personality_enc.")})
    assert torch.allclose(slim(**pre, personality_cls=cls_p).prediction, full, atol=1e-6)


def test_random_personality_encoder_is_deterministic(cfg):
    a, b = load_personality_encoder(cfg.model), load_personality_encoder(cfg.model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _pad_more(b, extra_tokens=5, extra_a=4, extra_v=3):
    b2 = dict(b)
    for k in ("input_ids", "attention_mask", "token_type_ids", "p_input_ids", "p_attention_mask", "p_token_type_ids"):
        b2[k] = torch.nn.functional.pad(b[k], (0, extra_tokens))
    b2["audio"] = torch.nn.functional.pad(b["audio"], (0, 0, 0, extra_a))
    b2["visual"] = torch.nn.functional.pad(b["visual"], (0, 0, 0, extra_v))
    return b2


def test_padding_invariance(cfg):
    m = _model(cfg).eval()
    b = make_batch(cfg.model, B=4)
    p1 = m(**model_inputs(b)).prediction
    p2 = m(**model_inputs(_pad_more(b))).prediction
    assert torch.allclose(p1, p2, atol=1e-5)


def test_reference_mode_attends_over_padding(cfg):
    """Without the key padding mask (reference), the zero frames that pad shorter rows up to the batch's longest
    are attended: the switch changes the prediction (same weights, masked vs unmasked)."""
    c = cfg.override(["model.cross_key_padding_mask=false", "model.cross_pad_to=null"])
    masked = cfg.override(["model.cross_key_padding_mask=true", "model.cross_pad_to=null"])
    b = make_batch(c.model, B=4)
    assert int(b["visual_lengths"].min()) < b["visual"].shape[1]  # some row is padded
    got = _model(c).eval()(**model_inputs(b)).prediction
    assert not torch.allclose(got, _model(masked).eval()(**model_inputs(b)).prediction, atol=1e-5)


def test_reference_mode_ignores_padding_beyond_the_longest_sequence(cfg):
    """... but frames beyond the batch's longest sequence (the collate's shape buckets, data.frame_pad_multiple)
    are cut before the unmasked attention, so bucketing cannot change the reference mode's predictions."""
    c = cfg.override(["model.cross_key_padding_mask=false", "model.cross_pad_to=null"])
    m = _model(c).eval()
    b = make_batch(c.model, B=4)
    torch.testing.assert_close(m(**model_inputs(b)).prediction, m(**model_inputs(_pad_more(b))).prediction,
                               atol=1e-5, rtol=1e-5)


def test_reference_pad_to_500_makes_batch_padding_irrelevant(cfg):
    c = cfg.override(["model.cross_key_padding_mask=false", "model.cross_pad_to=40"])
    m = _model(c).eval()
    b = make_batch(c.model, B=4)
    assert torch.allclose(m(**model_inputs(b)).prediction, m(**model_inputs(_pad_more(b))).prediction, atol=1e-5)


ABLATION_REMOVES = {
    "no_personality": ({"personality_enc", "text_projection", "personality_projection", "clip"}, {"ccl"}),
    "no_prefusion": ({"token_v", "token_a", "clip_ta", "clip_tv"}, {"clm"}),
    "no_enhanced_fusion": ({"v_dim_v", "a_dim_v", "layer_norm", "ys", "cnn"}, set()),
    "no_ps": ({"y_linear", "text_projection2"}, {"ps"}),
    "no_clm": ({"clip_ta", "clip_tv"}, {"clm"}),
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_removes_what_it_names(cfg, name):
    full = _model(cfg)
    c = ablate(cfg, name)
    m = _model(c).train()
    modules, terms_gone = ABLATION_REMOVES[name]
    present = {n for n, _ in full.named_children()}
    left = {n for n, _ in m.named_children()}
    assert modules <= present and not (modules & left)
    b = make_batch(c.model, B=4)
    out = m(**model_inputs(b))
    terms = compute_losses(out, b["label"], c.loss, c.model)
    assert not (terms_gone & set(terms)) and "l1" in terms and "total" in terms
    terms["total"].backward()  # every remaining trainable parameter still trains (DDP needs it)
    assert [n for n, p in m.named_parameters() if p.requires_grad and "embeddings" not in n and p.grad is None] == []
    if name == "no_personality":
        assert out.cls_personality is None and out.ccl_pair is None and "ps" in terms
    if name == "no_prefusion":
        assert all(h.shape[1] == b["input_ids"].shape[1] for h in out.hidden_states)
    if name == "no_enhanced_fusion":
        assert out.fused.shape == (4, 3 * c.model.av_dim)


def test_param_groups_split_bert_from_the_rest(cfg):
    m = _model(cfg)
    groups = param_groups(m, cfg.optim)
    names = {id(p): n for n, p in m.named_parameters()}
    bert = {names[id(p)].split(".")[0] for p in groups[0]["params"]}
    main = {names[id(p)].split(".")[0] for p in groups[1]["params"]}
    assert bert == {"text_bert", "mm_layers", "token_v", "token_a", "clip_ta", "clip_tv"}
    assert "personality_enc" not in bert | main and "fusion_prj" in main and "visual_enc" in main
    assert groups[0]["lr"] == cfg.optim.lr_bert and groups[1]["lr"] == cfg.optim.lr_main
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_trainable


def test_batch_of_one_works(cfg):
    m = _model(cfg).eval()
    b = {k: v[:1] for k, v in make_batch(cfg.model, B=3).items()}
    assert m(**model_inputs(b)).prediction.shape == (1,)


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b.update(audio=b["audio"][..., :-1]), "audio"),
    (lambda b: b.update(visual=torch.randn(4, 11, 3)), "visual"),
    (lambda b: b["audio"].__setitem__((0, 0, 0), float("nan")), "audio"),
    (lambda b: b["visual"].__setitem__((1, 0, 0), float("inf")), "visual"),
    (lambda b: b["audio_lengths"].__setitem__(1, 0), "audio_lengths"),
    (lambda b: b["visual_lengths"].__setitem__(1, 99), "visual_lengths"),
    (lambda b: b["attention_mask"].__setitem__((2, slice(2, None)), 0), "input_ids"),
    (lambda b: b["p_attention_mask"].__setitem__((2, slice(1, None)), 0), "p_input_ids"),
    (lambda b: b.update(personality_cls=torch.randn(4, 7)), "personality_cls"),
    (lambda b: b.update(attention_mask=b["attention_mask"][:, :-1]), "attention_mask"),
])
def test_bad_input_is_a_clear_value_error(cfg, mutate, field):
    """The user entry (predict) and the host validator on numpy arrays both name the field; forward checks
    only shapes (tests/test_input_checks.py)."""
    m = _model(cfg).eval()
    b = make_batch(cfg.model, B=4)
    mutate(b)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        m.predict(**model_inputs(b))
    host = {k: v.numpy() for k, v in model_inputs(b).items()}
    with pytest.raises(ValueError, match=rf"^{field}: "):
        check_inputs(host, cfg.model, personality_dim=m.personality_dim)


def test_lstm_encoder_equals_the_reference_packed_lstm_values_and_gradients():
    """RNNEncoder runs its LSTM over the padded batch; the reference packs the sequences. With valid-first frames
    the outputs at valid frames, the zeros beyond each length, h_T and every gradient agree to float round-off."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    enc = RNNEncoder(5, 8, 6)
    B, T = 7, 40
    lengths = torch.tensor([40, 1, 17, 33, 5, 40, 22])
    x = torch.randn(B, T, 5) * (torch.arange(T)[None, :, None] < lengths[:, None, None])
    h, seq = enc(x, lengths)
    (h.pow(2).sum() + seq.pow(3).sum()).backward()
    got = {k: p.grad.clone() for k, p in enc.named_parameters()}
    enc.zero_grad()
    packed = pack_padded_sequence(x.transpose(0, 1), lengths, enforce_sorted=False)
    out, (h_n, _) = enc.rnn(packed)
    ref_seq = pad_packed_sequence(out, total_length=T)[0].transpose(0, 1)
    ref_h = enc.linear_1(h_n[-1])
    (ref_h.pow(2).sum() + ref_seq.pow(3).sum()).backward()
    torch.testing.assert_close(seq, ref_seq, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h, ref_h, atol=1e-6, rtol=1e-5)
    assert not seq[1, 1:].any() and not seq[4, 5:].any()  # zero beyond each length
    for k, p in enc.named_parameters():
        torch.testing.assert_close(got[k], p.grad, atol=1e-5, rtol=1e-4, msg=k)
