"""Does a pretrained personality encoder help PSA-MF? (issue 12; docs/benchmarks.md "Personality pretraining").

The whole offline chain on synthetic data, both corpora with the same `--personality-signal` (default strong,
the planting under which the effect shows; weak = the default corpora): `synth --kind bigfive` -> `personality
pretrain` (tiny config, Ray Train local mode) -> `synth --kind mosi` -> `prepare` twice (CLS_p from the pretrained encoder; from the untrained
one, the tiny preset's seeded random BERT) -> the tiny preset trained per seed in local mode for three rows:
full model with the pretrained encoder, full model with the untrained encoder, "w/o personality"; and on request
(`--rows ...,oracle`) the full model with an oracle encoder, whose CLS_p is the planted e_v itself (the ceiling of
what any personality encoder could add).
Prints and writes (``--out``) test MAE / Corr / Acc-2 per row as mean ± population std over seeds.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/personality_effect.py --work /tmp/pe \
        --bigfive-scale 1.0 --scale 2.0 --epochs 10 --rows pretrained,untrained,none --seeds 1,2,3,4,5

(MOSI at scale 2.0: 104 / 20 / 62 speakers. At scale 1.0, MOSI's own size, the seed spread hides the encoder's
effect; docs/benchmarks.md, "MOSI at scale 2.0".)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psamf  # noqa: E402,F401  (before ray)


def planted_e(args) -> dict[str, float]:
    """Each clip's planted expressiveness e_v, by sample id, from the same seeded MOSI corpus the bench prepares."""
    from psamf.synth import generate

    corpus = generate("mosi", seed=0, scale=args.scale, personality_signal=args.personality_signal)
    return {i: float(x) for sp in corpus.splits.values() for i, x in zip(sp.ids, sp.expressiveness)}


def oracle_shards(src: str, dst: str, e_of: dict[str, float]) -> str:
    """A copy of the shard set `src` whose CLS_p is the clip's planted expressiveness e_v on a fixed random
    direction, (2 e_v - 1) u + N(0, 0.3^2) per dimension: an encoder that reads e_v perfectly. Each file appears
    only once complete (`atomic_open`), the manifest last."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from psamf.shards import read_manifest
    from psamf.storage import atomic_open

    if os.path.exists(f"{dst}/manifest.json"):
        return dst
    man = read_manifest(src)
    dim = int(man["personality_cls"]["dim"])
    rng = np.random.default_rng(0)
    u = rng.standard_normal(dim).astype(np.float32)
    for sh in man["shards"]:
        t = pq.read_table(f"{src}/{sh['path']}")
        e = np.array([e_of[i] for i in t.column("sample_id").to_pylist()], np.float32)
        cls = (2 * e - 1)[:, None] * u + 0.3 * rng.standard_normal((len(e), dim)).astype(np.float32)
        field = t.schema.field("personality_cls")
        t = t.set_column(t.schema.get_field_index("personality_cls"), field,
                         pa.FixedSizeListArray.from_arrays(pa.array(cls.reshape(-1)), dim).cast(field.type))
        out = f"{dst}/{sh['path']}"
        with atomic_open(out) as f:
            pq.write_table(t, f)
        sh["bytes"] = os.path.getsize(out)
    man["personality_cls"] = {**man["personality_cls"], "model": "oracle: (2 e_v - 1) u + noise (bench)"}
    with atomic_open(f"{dst}/manifest.json", "w") as f:
        json.dump(man, f, indent=1)
    return dst


def probe_cls(shards: str, e_of: dict[str, float]) -> dict[str, float]:
    """What a shard set's CLS_p says about the planted e_v: a ridge (`RidgeCV`) from CLS_p to the clip's e_v, fitted
    on the train split; Pearson r per split."""
    import numpy as np
    import pyarrow.parquet as pq
    from sklearn.linear_model import RidgeCV

    from psamf.shards import read_manifest

    xs: dict[str, list] = {}
    ys: dict[str, list] = {}
    for sh in read_manifest(shards)["shards"]:
        t = pq.read_table(f"{shards}/{sh['path']}", columns=["sample_id", "personality_cls"])
        xs.setdefault(sh["split"], []).append(np.asarray(t.column("personality_cls").to_pylist(), np.float64))
        ys.setdefault(sh["split"], []).extend(e_of[i] for i in t.column("sample_id").to_pylist())
    x = {k: np.concatenate(v) for k, v in xs.items()}
    y = {k: np.asarray(v) for k, v in ys.items()}
    ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(x["train"], y["train"])
    return {k: float(np.corrcoef(ridge.predict(x[k]), y[k])[0, 1]) for k in ("train", "valid", "test") if k in x}


def ridge_gain(shards: dict[str, str], e_of: dict[str, float]) -> dict[str, dict[str, float]]:
    """What a linear model gains from each encoder's CLS_p: ridge (alpha chosen on valid MAE) on the study's
    baseline features (log1p bag of words + z-scored pooled audio/visual, `psamf.study`), then on the same plus
    each row's CLS_p, plus the planted e_v itself, and plus e_v and e_v x pooled a/v (the gate g_v is linear in
    e_v and multiplies the nonverbal cues). Valid and test MAE per feature set."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from scipy import sparse
    from sklearn.linear_model import Ridge

    from psamf.shards import read_manifest
    from psamf.study import _features

    def tables(d: str) -> dict[str, "pa.Table"]:
        man = read_manifest(d)
        return {s: pa.concat_tables([pq.read_table(f"{d}/{x['path']}") for x in man["shards"] if x["split"] == s])
                for s in ("train", "valid", "test")}

    t = {row: tables(d) for row, d in shards.items()}
    first = t[next(iter(t))]
    vocab = 1 + max(int(np.max(np.asarray(first[s].column("input_ids").combine_chunks().flatten()))) for s in first)
    feats = {s: _features(first[s], vocab) for s in first}
    mu, sd = feats["train"][1].mean(0), feats["train"][1].std(0)
    sd[sd < 1e-8] = 1.0
    av = {s: (feats[s][1] - mu) / sd for s in feats}
    ev = {s: np.array([e_of[i] for i in first[s].column("sample_id").to_pylist()])[:, None] for s in feats}

    def fit(extra) -> dict[str, float]:
        x = {s: sparse.hstack([feats[s][0], sparse.csr_matrix(av[s])]
                              + ([sparse.csr_matrix(extra(s))] if extra else []), format="csr") for s in feats}
        y = {s: feats[s][2] for s in feats}
        best = None
        for a in np.logspace(-2, 3, 11):
            m = Ridge(alpha=a).fit(x["train"], y["train"])
            v = float(np.mean(np.abs(m.predict(x["valid"]) - y["valid"])))
            if best is None or v < best[0]:
                best = (v, m)
        return {"valid_mae": best[0], "test_mae": float(np.mean(np.abs(best[1].predict(x["test"]) - y["test"])))}

    out = {"bow+av": fit(None)}
    for row in t:  # the same sample order in every shard set of one corpus (one prepare of one pickle)
        out[f"+CLS_p ({row})"] = fit(lambda s, row=row: np.asarray(t[row][s].column("personality_cls").to_pylist()))
    out["+e_v"] = fit(lambda s: ev[s])
    out["+e_v, e_v x a/v"] = fit(lambda s: np.hstack([ev[s], ev[s] * av[s]]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--scale", type=float, default=0.5, help="MOSI scale")
    p.add_argument("--bigfive-scale", type=float, default=0.3)
    p.add_argument("--personality-signal", choices=("weak", "strong"), default="strong")
    p.add_argument("--rows", default="pretrained,untrained,none",
                   help="which rows: pretrained (full, pretrained encoder), untrained, none (w/o personality), "
                        "oracle (full, CLS_p = the planted e_v itself: the most any encoder could give)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--epochs", type=int, default=6, help="PSA-MF epochs (tiny preset: 6)")
    p.add_argument("--pretrain-epochs", type=int, default=6)
    p.add_argument("--encoder", default=None, help="an already pretrained encoder directory (skips pretraining)")
    p.add_argument("--probe-only", action="store_true",
                   help="prepare the shards, print what each encoder's CLS_p says about e_v (ridge r) and what it "
                        "adds to a linear model of the label (ridge MAE), train nothing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every PSA-MF row, as on psamf train's command line "
                        "(e.g. --set optim.lr_main=1e-3); repeatable")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from psamf.config import Config, ablate
    from psamf.prepare import prepare
    from psamf.pretrain import PretrainConfig, format_report, pretrain
    from psamf.synth import synthesize, synthesize_bigfive
    from psamf.train import train

    w = os.path.abspath(args.work)
    os.makedirs(w, exist_ok=True)
    enc = args.encoder
    pre_metrics = None
    if enc is None:
        t0 = time.perf_counter()
        bf = synthesize_bigfive(f"{w}/bigfive", "csv", seed=0, scale=args.bigfive_scale,
                                personality_signal=args.personality_signal)["corpus"]
        res = pretrain(PretrainConfig(data=str(bf), model="psamf:tiny-config", out=f"{w}/encoder",
                                      storage_path=f"{w}/runs", epochs=args.pretrain_epochs, lr=1e-3,
                                      num_workers=0, max_len=32))
        print(format_report(res.metrics), f"\npretraining took {time.perf_counter() - t0:.0f} s", flush=True)
        enc, pre_metrics = res.out, {k: res.metrics[k]["mean_r"] for k in ("untrained", "pretrained_ridge", "pretrained")}
    pkl = synthesize("mosi", "mmsa", f"{w}/mosi", seed=0, scale=args.scale,
                     personality_signal=args.personality_signal)["pickle"]
    src = {"format": "mmsa", "input": str(pkl), "dataset": "mosi"}
    tiny = Config.from_preset("tiny")
    shards = {}
    for row, model in (("pretrained", dataclasses.replace(tiny.model, personality_model=enc)),
                       ("untrained", tiny.model)):
        shards[row] = f"{w}/shards-{row}"
        if not os.path.exists(f"{shards[row]}/manifest.json"):
            prepare(src, shards[row], tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny", max_text_len=32,
                    personality_model=model)
    e_of = planted_e(args)
    if "oracle" in args.rows.split(","):
        shards["oracle"] = oracle_shards(shards["untrained"], f"{w}/shards-oracle", e_of)
    probe = {row: probe_cls(d, e_of) for row, d in shards.items()}
    for row, r in probe.items():
        print(f"CLS_p -> e_v ridge ({row} encoder): " + ", ".join(f"{k} r {v:.3f}" for k, v in r.items()), flush=True)
    if args.probe_only:
        for name, r in ridge_gain(shards, e_of).items():
            print(f"label ridge, {name:28s} valid MAE {r['valid_mae']:.3f}  test MAE {r['test_mae']:.3f}", flush=True)
        return 0
    base = tiny.replace({"run.num_workers": 0, "run.storage_path": f"{w}/runs",
                         "optim.epochs": args.epochs}).override(args.set)
    all_rows = {
        "pretrained": ("full, pretrained encoder",
                       base.replace({"data.uri": shards["pretrained"], "model.personality_model": enc})),
        "untrained": ("full, untrained encoder", base.replace({"data.uri": shards["untrained"]})),
        "none": ("w/o personality", ablate(base.replace({"data.uri": shards["untrained"]}), "no_personality")),
    }
    if "oracle" in shards:
        all_rows["oracle"] = ("full, oracle encoder", base.replace({"data.uri": shards["oracle"]}))
    rows = dict(all_rows[k] for k in args.rows.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    out: dict = {"scale": args.scale, "seeds": seeds, "epochs": args.epochs, "encoder": enc,
                 "personality_signal": args.personality_signal, "bigfive_scale": args.bigfive_scale,
                 "overrides": args.set, "cls_probe_r": probe,
                 "encoder_test_mean_r": pre_metrics, "rows": {}}
    for label, cfg in rows.items():
        per = []
        for s in seeds:
            slug = label.replace(",", "").replace(" ", "-").replace("/", "")
            r = train(cfg.replace({"optim.seed": s, "run.name": f"{slug}-seed{s}"}))
            per.append({k: r.metrics["test"][k] for k in ("mae", "corr", "acc2_non0")})
            print(label, s, per[-1], flush=True)
            if args.out:  # partial results survive an interrupted run
                with open(args.out + ".partial", "a") as f:
                    f.write(json.dumps({"row": label, "seed": s, **per[-1]}) + "\n")
        import numpy as np

        out["rows"][label] = {"per_seed": per, **{k: [float(np.mean([q[k] for q in per])), float(np.std([q[k] for q in per]))]
                                                  for k in ("mae", "corr", "acc2_non0")}}
    for label, r in out["rows"].items():
        print(f"{label:28s} MAE {r['mae'][0]:.3f} ± {r['mae'][1]:.3f}  Corr {r['corr'][0]:.3f} ± {r['corr'][1]:.3f}  "
              f"Acc-2 {r['acc2_non0'][0]:.3f} ± {r['acc2_non0'][1]:.3f}")
    from psamf.study import paired_test

    ref = next(iter(out["rows"]))  # paired by seed against the first row, with psamf study's flag rule
    for label, r in out["rows"].items():
        if label != ref:
            c = paired_test([q["mae"] for q in out["rows"][ref]["per_seed"]], [q["mae"] for q in r["per_seed"]], "mae")
            r["vs_first_row"] = {"mae_diff": c.diff, "p": c.p, "flag": c.flag}
            print(f"{label} vs {ref}: MAE {c.diff:+.3f} (p={c.p:.2g}), flag: {c.flag or 'within the seed spread'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
