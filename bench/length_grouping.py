"""Length-grouped (padding-free) vs uniformly shuffled training batches: accuracy over seeds, padded-token share and
epoch time (issue 11, item 2; docs/benchmarks.md, "Length grouping").

Each row trains the tiny preset once per seed in Ray Train local mode on the same shards; only the batching differs:

    shuffle   data.length_grouping=false: every window of group_window x batch_size rows permuted
    grouped   data.length_grouping=true, data.length_noise=0.05 (the defaults): each window sorted by jittered
              transcript length, cut into batches, batch order shuffled
    noise0.1  (on request) the same with more jitter, data.length_noise=0.1
    strict    (on request) grouping without jitter, data.length_noise=0

Runs are `<work>/runs/lg-<row>-seed<k>`: rerunning with the same --work resumes them (a finished run is not
retrained), so use a new --work when the code or a row's settings change. Seed k sets both `optim.seed` and
`data.shuffle_seed`, so the initialisation and the data order vary across seeds and
are the same across rows (paired). Reported: test metrics of the validation-selected epoch, mean ± population std
over seeds, the paired difference of each row to `shuffle` with `psamf study`'s flag rule (every seed the same
direction and the mean difference beyond both rows' seed spread), and from each run's history the padded share of
the sentiment BERT's token positions and the training time per epoch.

    # a corpus of its own: synthetic MOSI at scale 2.0, strong signal, CLS_p from the tiny preset's seeded BERT
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/length_grouping.py --work /tmp/lg --seeds 1,2,3,4,5
    # the issue-12 corpus with the pretrained personality encoder (bench/personality_effect.py --work /tmp/pe3 ...)
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/length_grouping.py --work /tmp/lg \\
        --shards /tmp/pe3/shards-pretrained --set model.personality_model=/tmp/pe3/encoder --seeds 1,2,3,4,5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psamf  # noqa: E402,F401  (before ray)

ROWS = {
    "shuffle": ["data.length_grouping=false"],
    "grouped": ["data.length_grouping=true", "data.length_noise=0.05"],
    "noise0.1": ["data.length_grouping=true", "data.length_noise=0.1"],
    "strict": ["data.length_grouping=true", "data.length_noise=0.0"],
}
METRICS = ("mae", "corr", "acc7", "acc2_has0", "acc2_non0", "f1_has0", "f1_non0")


def corpus(work: str, scale: float, signal: str) -> str:
    """Synthetic MOSI prepared with the tiny tokenizer (32 tokens) and the tiny preset's seeded personality BERT."""
    from psamf.config import Config
    from psamf.prepare import prepare
    from psamf.synth import synthesize

    out = f"{work}/shards"
    if not os.path.exists(f"{out}/manifest.json"):
        pkl = synthesize("mosi", "mmsa", f"{work}/mosi", seed=0, scale=scale, personality_signal=signal)["pickle"]
        prepare({"format": "mmsa", "input": str(pkl), "dataset": "mosi"}, out, tokenizer="psamf:tiny",
                personality_tokenizer="psamf:tiny", max_text_len=32, personality_model=Config.from_preset("tiny").model)
    return out


def run_stats(history: list[dict], metrics: dict) -> dict[str, float]:
    """Padded token share (all epochs), training seconds per epoch (epochs after the first: no start-up), the
    selected epoch."""
    pad = [r["train_padded_token_frac"] for r in history if "train_padded_token_frac" in r]
    later = [r["time_train_s"] for r in history[1:]] or [r["time_train_s"] for r in history]
    return {"padded_token_frac": float(sum(pad) / len(pad)) if pad else math.nan,
            "epoch_train_s": float(sum(later) / len(later)), "epochs_run": len(history),
            "best_epoch": metrics.get("selection", {}).get("selected_epoch")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--shards", default=None, help="an already prepared shard directory (default: build one)")
    p.add_argument("--scale", type=float, default=2.0, help="synthetic MOSI scale when building the corpus")
    p.add_argument("--personality-signal", choices=("weak", "strong"), default="strong")
    p.add_argument("--rows", default="shuffle,grouped", help=f"rows among {', '.join(ROWS)}; the first is the "
                                                             "reference of the paired comparison")
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every row (e.g. --set model.personality_model=DIR); repeatable")
    p.add_argument("--out", default=None, help="JSON results (default: <work>/length-grouping.json)")
    p.add_argument("--reuse", action="append", default=[], metavar="FILE",
                   help="an earlier results JSON of this bench on the same shards and epochs: its (row, seed) runs "
                        "are taken as done, not rerun (e.g. add a row to a finished comparison); repeatable")
    args = p.parse_args(argv)

    from psamf.config import Config
    from psamf.metrics import summarize_seeds
    from psamf.study import compare_to_reference, power_note
    from psamf.train import train

    w = os.path.abspath(args.work)
    os.makedirs(w, exist_ok=True)
    shards = os.path.abspath(args.shards) if args.shards else corpus(w, args.scale, args.personality_signal)
    out_path = args.out or f"{w}/length-grouping.json"
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose among {list(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    base = Config.from_preset("tiny").replace({"run.num_workers": 0, "run.storage_path": f"{w}/runs",
                                               "data.uri": shards, "optim.epochs": args.epochs}).override(args.set)
    res: dict = {"shards": shards, "seeds": seeds, "epochs": args.epochs, "overrides": args.set,
                 "rows": {r: {"overrides": ROWS[r], "per_seed": {}} for r in rows}}
    for path in args.reuse:
        with open(path) as f:
            old = json.load(f)
        if os.path.abspath(old["shards"]) != shards or old["epochs"] != args.epochs:
            p.error(f"--reuse {path}: other shards or epochs ({old['shards']}, {old['epochs']})")
        for r, e in old["rows"].items():
            if r in res["rows"]:
                res["rows"][r]["per_seed"].update({int(s): v for s, v in e["per_seed"].items() if int(s) in seeds})
                res["rows"][r]["reused_from"] = path
    t_all = time.perf_counter()
    for s in seeds:  # seeds outermost: an interrupted run still has paired rows
        for r in rows:
            if s in res["rows"][r]["per_seed"]:
                continue
            cfg = base.override(ROWS[r]).replace({"optim.seed": s, "data.shuffle_seed": s,
                                                   "run.name": f"lg-{r}-seed{s}"})
            t0 = time.perf_counter()
            tr = train(cfg)
            test = {k: float(tr.metrics["test"][k]) for k in METRICS if tr.metrics["test"].get(k) is not None}
            st = run_stats(tr.history, tr.metrics)
            res["rows"][r]["per_seed"][s] = {"test": test, **st, "wall_s": round(time.perf_counter() - t0, 1)}
            print(f"{r:8s} seed {s}: test MAE {test['mae']:.4f} Corr {test['corr']:.4f} padded tokens "
                  f"{100 * st['padded_token_frac']:.1f} % epoch {st['epoch_train_s']:.2f} s", flush=True)
            with open(out_path + ".partial", "w") as f:
                json.dump(res, f, indent=1)
    per_row = {r: {s: v["test"] for s, v in e["per_seed"].items()} for r, e in res["rows"].items()}
    comps = compare_to_reference(per_row, rows[0], METRICS)
    lines = [f"Test metrics of the validation-selected epoch, mean ± population std over seeds {seeds} "
             f"({args.epochs} epochs, tiny preset); padded tokens = padded share of the sentiment BERT's token "
             "positions in training; epoch = training seconds per epoch after the first.", "",
             "| batches | MAE | Corr | Acc-7 | Acc-2 (Non0) | padded tokens | epoch (s) |",
             "|---|---|---|---|---|---|---|"]
    for r, e in res["rows"].items():
        vals = list(e["per_seed"].values())
        cell = summarize_seeds([{k: v["test"][k] for k in METRICS} for v in vals])  # mean, population std
        pad, ep = summarize_seeds([{"pad": v["padded_token_frac"], "ep": v["epoch_train_s"]} for v in vals]).values()
        e["summary"] = {**{k: {"mean": m, "std": sd} for k, (m, sd) in cell.items()},
                        "padded_token_frac": {"mean": pad[0], "std": pad[1]},
                        "epoch_train_s": {"mean": ep[0], "std": ep[1]}}
        lines.append(f"| {r} | {cell['mae'][0]:.3f} ± {cell['mae'][1]:.3f} | {cell['corr'][0]:.3f} ± "
                     f"{cell['corr'][1]:.3f} | {100 * cell['acc7'][0]:.1f} ± {100 * cell['acc7'][1]:.1f} | "
                     f"{100 * cell['acc2_non0'][0]:.1f} ± {100 * cell['acc2_non0'][1]:.1f} | {100 * pad[0]:.1f} % | "
                     f"{ep[0]:.2f} ± {ep[1]:.2f} |")
    lines += ["", f"Paired difference to `{rows[0]}` (row − {rows[0]}, by seed; p of a paired t-test; flagged = "
              "every seed the same direction and |difference| beyond both rows' seed spread):", "",
              "| batches | " + " | ".join(f"Δ{k}" for k in METRICS) + " | flagged |",
              "|" + "---|" * (len(METRICS) + 2)]
    for r, cs in comps.items():
        res["rows"][r]["vs_reference"] = {k: vars(c) for k, c in cs.items()}
        flags = [f"{c.flag}: {k}" for k, c in cs.items() if c.flag]
        lines.append(f"| {r} | " + " | ".join(f"{c.diff:+.4f} (p={c.p:.2f})" for c in cs.values())
                     + f" | {'; '.join(flags) or 'no'} |")
    lines += ["", power_note(len(seeds))]
    res["table"] = "\n".join(lines)
    res["wall_s"] = round(time.perf_counter() - t_all, 1)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    print(res["table"])
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
