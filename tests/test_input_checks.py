"""Input checks live at the data boundary, not in PSAMF.forward.

`forward` must not dispatch an op that reads device data back to the host (on a GPU each one stalls the step
until the queue drains). Without a GPU this is proven from the ops themselves: a TorchDispatchMode records every
aten op dispatched during forward and flags the ones that sync on a GPU. Tensors that PyTorch keeps on the host
by contract (a PackedSequence's `batch_sizes`, and anything computed only from them) are exempt, because they
stay on the CPU in a GPU run too.
"""

from __future__ import annotations

import traceback
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from psamf.config import Config, ablate
from psamf.data import PadCollate
from psamf.model import build_model, check_inputs, model_inputs
from tests.helpers import make_batch, tiny_cfg
from tests.test_data import hand_table

torch.set_num_threads(1)

# ops that copy device data to the host, or whose output size depends on device data
SYNC_OPS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.nonzero", "aten.equal",
            "aten.masked_select", "aten._unique2", "aten.unique_consecutive", "aten.unique_dim",
            "aten.nonzero_static", "aten.allclose"}


class HostSyncRecorder(TorchDispatchMode):
    """Records the GPU-syncing ops dispatched inside the block, with where they were called from."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self._host: dict[int, weakref.ref] = {}

    def _is_host(self, t: torch.Tensor) -> bool:
        r = self._host.get(id(t))
        return r is not None and r() is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host_only = bool(inputs) and all(self._is_host(t) for t in inputs)
        if name in SYNC_OPS and not host_only:
            caller = [f for f in traceback.extract_stack()[:-1]  # without this frame, dynamo or dispatch glue
                      if not any(p in f.filename for p in ("torch/utils", "torch/_dynamo", "torch/_compile"))][-3:]
            self.syncs.append(f"{name} at " + " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}"
                                                         for f in reversed(caller)))
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name == "aten._pack_padded_sequence":
            outs = outs[1:2]  # batch_sizes: a CPU tensor by PyTorch's contract, also in a GPU run
        elif not host_only:
            outs = []
        for t in outs:
            self._host[id(t)] = weakref.ref(t)
        return out


def test_the_recorder_sees_a_sync_and_exempts_packed_batch_sizes():
    """The instrument itself can fail: a scalar read of ordinary data is flagged, batch_sizes is not."""
    x = torch.randn(3, 4, 2)
    with HostSyncRecorder() as rec:
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 2, 1]), batch_first=True,
                                                         enforce_sorted=False)
        int(packed.batch_sizes[0])
    assert rec.syncs == []
    with HostSyncRecorder() as rec:
        if (x > 10).any():
            pass
        x.sum().item()
    assert len(rec.syncs) == 2 and all("_local_scalar_dense" in s for s in rec.syncs)


@pytest.mark.parametrize("precomputed_cls", [False, True], ids=["personality-encoder", "precomputed-cls"])
def test_forward_dispatches_no_host_sync(precomputed_cls):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    m = build_model(cfg.model).train()  # the training hot path
    b = model_inputs(make_batch(cfg.model, B=4))
    if precomputed_cls:
        b["personality_cls"] = m.personality_cls(b.pop("p_input_ids"), b.pop("p_attention_mask"),
                                                 b.pop("p_token_type_ids"))
    with HostSyncRecorder() as rec:
        out = m(**b)
    assert out.prediction.shape == (4,)
    assert rec.syncs == [], "\n".join(rec.syncs)


def test_forward_leaves_values_to_the_boundary_and_predict_checks_them():
    """forward runs on NaN features (no value check on the hot path); predict refuses them, and on good
    input predict is forward without gradients."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    m = build_model(cfg.model).eval()
    b = model_inputs(make_batch(cfg.model, B=4))
    want = m(**b).prediction
    got = m.predict(**b).prediction
    assert torch.equal(got, want) and not got.requires_grad
    b["audio"][0, 0, 0] = float("nan")
    assert m(**b).prediction.shape == (4,)
    with pytest.raises(ValueError, match="audio: 1 NaN/inf"):
        m.predict(**b)


def test_check_inputs_takes_numpy_and_skips_unused_personality_tokens():
    cfg = tiny_cfg()
    b = {k: v.numpy() for k, v in model_inputs(make_batch(cfg.model, B=3)).items()}
    check_inputs(b, cfg.model)
    b["p_attention_mask"][1, 1:] = 0  # empty personality transcript ...
    with pytest.raises(ValueError, match="p_input_ids: empty transcript in batch row\\(s\\) \\[1\\]"):
        check_inputs(b, cfg.model)
    check_inputs(b | {"personality_cls": np.zeros((3, 8), np.float32)}, cfg.model)  # ... not encoded: fine
    check_inputs(b, ablate(cfg, "no_personality").model)
    with pytest.raises(ValueError, match="visual_lengths: missing"):
        check_inputs({k: v for k, v in b.items() if k != "visual_lengths"})


def test_collate_rejects_a_bad_batch_on_the_host():
    assert PadCollate()(hand_table())["input_ids"].shape == (3, 6)
    with pytest.raises(ValueError, match="input_ids: empty transcript .* row\\(s\\) \\[1\\]"):
        PadCollate()(hand_table(t_lens=(4, 2, 6)))
    with pytest.raises(ValueError, match="p_input_ids: empty transcript"):
        PadCollate()(hand_table(p_lens=(3, 5, 1)))
    # with precomputed CLS_p the personality tokens are never encoded, so they are not checked
    PadCollate()(hand_table(with_cls=True, p_lens=(3, 5, 1)))


@pytest.mark.parametrize("n_batches", [1, 4])
def test_evaluate_reads_the_device_twice_per_pass_not_per_batch(n_batches, monkeypatch):
    """Evaluation keeps predictions and loss sums on the device and copies each back once at the end of the pass;
    labels come from the collate's host copy. Before, every batch read five loss terms (`float`), its predictions
    and its labels back: seven stalls of a GPU's queue per batch. Counted here: the syncing ops the recorder sees,
    plus every `.cpu()`, `.tolist()` and `.item()` call (on a CPU tensor `.cpu()` dispatches nothing)."""
    from psamf.engine import evaluate

    cfg = tiny_cfg()
    torch.manual_seed(0)
    m = build_model(cfg.model)
    batches = []
    for s in range(n_batches):
        b = make_batch(cfg.model, B=4, seed=s)
        b["sample_id"] = [f"v{4 * s + i}" for i in range(4)]
        batches.append(b)
    reads: list[str] = []
    for name in ("cpu", "tolist", "item"):
        fn = getattr(torch.Tensor, name)

        def counted(self, *a, _fn=fn, _name=name, **k):
            reads.append(_name)
            return _fn(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with HostSyncRecorder() as rec:
        out = evaluate(m, batches, Config.from_preset("tiny"))
    monkeypatch.undo()
    assert rec.syncs == [], "\n".join(rec.syncs)
    assert sorted(reads) == ["cpu", "cpu", "tolist"], reads  # predictions, loss sums (+ their list)
    assert out.n == 4 * n_batches and out.pred.shape == out.label.shape == (4 * n_batches,)
    np.testing.assert_array_equal(out.label, torch.cat([b["label"] for b in batches]).numpy())
    assert set(out.loss_sums) == {"total", "l1", "ccl", "ps", "clm"}
    l1 = float(np.mean(np.abs(out.pred.astype(np.float64) - out.label)))
    assert out.loss_sums["l1"] / out.n == pytest.approx(l1, rel=1e-5)  # batch means x batch size = per-sample sum
