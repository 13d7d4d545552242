"""psamf.flops: the FLOP formulas against torch's own FLOP counter on real HF BERT modules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from psamf.flops import bare_bert_step_flops, bert_layer_flops, mfu, peak_tflops, step_flops
from tests.helpers import tiny_cfg


def _bert(cfg):
    from transformers import BertConfig, BertModel

    m = cfg.model
    return BertModel(BertConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.bert_layers,
                                num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
                                max_position_embeddings=m.max_position_embeddings), add_pooling_layer=False)


def test_bert_formulas_match_torch_flop_counter():
    """Forward of one layer exactly; forward + backward of the whole BERT = 3x forward (the embedding lookup and
    its gradient are not matrix work)."""
    cfg = tiny_cfg()
    bert = _bert(cfg)
    B, S = 3, 10
    ids = torch.randint(5, 100, (B, S))
    h = bert.embeddings(input_ids=ids)
    with FlopCounterMode(display=False) as fc:
        bert.encoder.layer[0](h)
    assert fc.get_total_flops() == B * bert_layer_flops(cfg.model.hidden_size, cfg.model.intermediate_size, S)
    with FlopCounterMode(display=False) as fc:
        bert(input_ids=ids).last_hidden_state.sum().backward()
    assert fc.get_total_flops() == bare_bert_step_flops(cfg.model, B, S)


def test_step_flops_parts_and_mfu():
    m = tiny_cfg().model
    f = step_flops(m, 4, 12, 9, 11)
    assert f["total"] == sum(v for k, v in f.items() if k != "total")
    assert f["bert_text"] + f["bert_multimodal"] > f["rest"] > 0 and f["lstm"] > 0
    with_bert = step_flops(m, 4, 12, 9, 11, precomputed_personality=False)
    assert with_bert["personality_forward"] > 0 and with_bert["total"] > f["total"]
    assert mfu(2e12, 0.5, 8.0) == pytest.approx(0.5)
    assert peak_tflops("cpu", "off", override=12.5) == (12.5, "--peak-tflops")
