"""Two parts of a training step that a CPU step spent most of its non-BERT time in, timed alone, old and new form.

    optimizer   torch.optim.Adam over the preset's trainable parameters (psamf.model.param_groups): the
                single-tensor default, foreach, and the fused kernel (engine.build_optimizer uses fused); and
                clip_grad_norm_ over the same gradients
    lstm        each RNNEncoder's LSTM, forward + backward at batch B over MOSI's frame counts (audio 375 x 5,
                visual 500 x 20; true lengths drawn between a quarter of the maximum and the maximum): over a
                PackedSequence (the reference's form, psamf's before 2026-12-02) and over the padded batch with
                the padding zeroed (psamf.model.RNNEncoder now); with the largest difference of their outputs

Best of --reps after one warm-up, on random data and random initialisation.

    OMP_NUM_THREADS=2 .venv/bin/python bench/components.py --preset paper --batch-size 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from psamf.config import Config  # noqa: E402
from psamf.model import RNNEncoder, build_model, param_groups  # noqa: E402


def best_of(f, reps: int) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def packed_forward(enc: RNNEncoder, x: torch.Tensor, lengths: torch.Tensor):
    """The reference's form: pack, LSTM, unpack to the batch's frame count."""
    packed = pack_padded_sequence(x.transpose(0, 1), lengths, enforce_sorted=False)
    out, (h_n, _) = enc.rnn(packed)
    seq = pad_packed_sequence(out, total_length=x.shape[1])[0]
    return (enc.linear_1(h_n[-1]) if enc.linear_1 is not None else None), seq.transpose(0, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config.from_preset(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg.model, with_personality_encoder=False)
    out: dict = {"preset": args.preset, "batch_size": args.batch_size, "torch": torch.__version__,
                 "threads": torch.get_num_threads()}

    params = [q for q in model.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    out["trainable_params"] = sum(q.numel() for q in params)
    out["clip_grad_norm_s"] = best_of(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), args.reps)
    for name, kw in (("single_tensor", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.Adam([g for g in param_groups(model, cfg.optim) if g["params"]], **kw)
        out[f"adam_{name}_s"] = best_of(opt.step, args.reps)

    g = torch.Generator().manual_seed(0)
    B = args.batch_size
    for name, enc in (("audio", model.acoustic_enc), ("visual", model.visual_enc)):
        T = 375 if name == "audio" else 500
        lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
        lengths[0] = T
        valid = torch.arange(T)[None, :, None] < lengths[:, None, None]
        x = torch.randn(B, T, enc.rnn.input_size, generator=g) * valid
        with torch.no_grad():
            h_p, s_p = packed_forward(enc, x, lengths)
            h_d, s_d = enc(x, lengths)
        out[f"lstm_{name}_max_abs_diff"] = max(float((s_p - s_d).abs().max()),
                                               float((h_p - h_d).abs().max()) if h_p is not None else 0.0)
        for form, f in (("packed", packed_forward), ("padded", RNNEncoder.forward)):
            def fwd_bwd(f=f):
                enc.zero_grad(set_to_none=True)
                h, s = f(enc, x, lengths)
                (s.pow(2).mean() + (h.pow(2).mean() if h is not None else 0)).backward()
            out[f"lstm_{name}_{form}_s"] = best_of(fwd_bwd, args.reps)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) and v > 1e-3 else v) for k, v in out.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
