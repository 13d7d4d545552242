"""Benchmark `psamf prepare` on a synthetic corpus (default: MOSEI-sized, 22,856 utterances).

    OMP_NUM_THREADS=1 .venv/bin/python bench/prepare.py --kind mosei --out /tmp/psamf-bench [--layouts ragged fixed]

Generates the corpus with `psamf.synth.generate` (same shapes and length distribution as the MMSA
release: MOSEI audio (≤500, 74), visual (≤500, 35)), turns it into a `RawDataset` the way the readers do
(valid frames only, NaN/inf zeroed) — or, with `--via-pickle`, writes the MMSA pickle and reads it back
with `psamf.sources.read_mmsa` (slower, needs ~2x the memory) — then runs `prepare` once per layout and
prints rows/s, the per-stage timings, bytes on disk and the shard count. The shard directories are kept
(`<out>/<kind>-<layout>`) for bench/stream.py. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psamf import prepare as prep  # noqa: E402
from psamf.sources import RawDataset, RawSplit  # noqa: E402
from psamf.tokenizers import TINY  # noqa: E402


def synth_raw(kind: str, seed: int, scale: float) -> RawDataset:
    """In-memory equivalent of synthesize -> read_mmsa (valid frames, NaN/inf -> 0, counted)."""
    from psamf.synth import KINDS, generate

    corpus = generate(kind, seed=seed, scale=scale)
    spec = KINDS[kind]
    repairs = {"audio_nonfinite_values_zeroed": 0, "visual_nonfinite_values_zeroed": 0}
    splits = {}
    for name, sp in corpus.splits.items():
        audio, visual = [], []
        for i in range(len(sp)):
            for frames, out, key in ((sp.audio_frames(i), audio, "audio"), (sp.vision_frames(i), visual, "visual")):
                bad = ~np.isfinite(frames)
                if bad.any():
                    repairs[f"{key}_nonfinite_values_zeroed"] += int(bad.sum())
                    frames = np.where(bad, 0.0, frames).astype(np.float32)
                else:
                    frames = frames.copy()
                out.append(frames)
        splits[name] = RawSplit(ids=sp.ids, text=sp.text, label=sp.label.astype(np.float32), audio=audio,
                                visual=visual, speaker=list(sp.videos))
        sp.audio = sp.vision = None  # free the padded arrays as we go
    return RawDataset(name=kind, splits=splits, audio_dim=spec.audio_dim, visual_dim=spec.visual_dim,
                      label_range=spec.label_range, source_files={f"synth:{kind}:seed={seed}:scale={scale}": "0" * 64},
                      repairs=repairs, padding_side={"audio": "right", "visual": "right"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="mosei")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/psamf-bench")
    ap.add_argument("--layouts", nargs="+", default=["ragged", "fixed"], choices=prep.LAYOUTS)
    ap.add_argument("--target-shard-mb", type=float, default=prep.DEFAULT_TARGET_SHARD_MB)
    ap.add_argument("--via-pickle", action="store_true", help="synthesize the MMSA pickle and read it with read_mmsa")
    ap.add_argument("--personality-cls", default=None, metavar="PRESET",
                    help="also precompute personality_cls with this config preset's encoder (Ray Data pass)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if args.via_pickle:
        from psamf.sources import read_mmsa
        from psamf.synth import synthesize

        paths = synthesize(args.kind, "mmsa", out / f"{args.kind}-src", seed=args.seed, scale=args.scale)
        t_syn = time.perf_counter() - t
        t = time.perf_counter()
        raw = read_mmsa(paths["pickle"], args.kind)
        t_read = time.perf_counter() - t
        print(f"synthesize {t_syn:.1f} s, read_mmsa {t_read:.1f} s")
    else:
        raw = synth_raw(args.kind, args.seed, args.scale)
        print(f"generate + to RawDataset: {time.perf_counter() - t:.1f} s")
    n = sum(len(s) for s in raw.splits.values())
    frames = {m: np.array([len(f) for s in raw.splits.values() for f in getattr(s, m)]) for m in ("audio", "visual")}
    print(f"{args.kind}: {n} utterances {dict((k, len(v)) for k, v in raw.splits.items())}; "
          f"audio len mean {frames['audio'].mean():.0f} / max {frames['audio'].max()}, "
          f"visual len mean {frames['visual'].mean():.0f} / max {frames['visual'].max()}")
    results = []
    pmodel = None
    if args.personality_cls:
        from psamf.config import Config

        pmodel = Config.from_preset(args.personality_cls).model
    for layout in args.layouts:
        dest = out / f"{args.kind}-{layout}" if not pmodel else out / f"{args.kind}-{layout}-cls"
        t = time.perf_counter()
        man = prep.prepare(raw, str(dest), tokenizer=TINY, personality_tokenizer=TINY, max_text_len=50,
                           layout=layout, target_shard_mb=args.target_shard_mb, personality_model=pmodel)
        wall = time.perf_counter() - t
        disk = sum(s["bytes"] for s in man["shards"])
        arrow = sum(s["arrow_bytes"] for s in man["shards"])
        r = {"layout": layout, "rows": n, "seconds": round(wall, 2), "rows_per_s": round(n / wall),
             "disk_mb": round(disk / 2**20, 1), "arrow_mb": round(arrow / 2**20, 1), "shards": len(man["shards"]),
             "rows_per_shard": man["rows_per_shard"], "timings": man["timings_seconds"], "out": str(dest)}
        results.append(r)
        print(f"[{layout:6s}] {n} rows in {wall:.1f} s = {n / wall:,.0f} rows/s; on disk {r['disk_mb']} MiB "
              f"(in memory {r['arrow_mb']} MiB), {r['shards']} shards x {r['rows_per_shard']} rows; "
              f"stages {man['timings_seconds']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
