"""What every `psamf` command that starts from a config shares: the same way to name one and to load it.

    --preset NAME | --config FILE     where to start (default: the `tiny` preset)
    --ablation NAME [--ablation ...]  rows of the paper's ablation table, composed in the order given
    section.key=value ...             overrides, validated like the YAML file
"""

from __future__ import annotations

import argparse

from psamf.config import ABLATIONS, Config, ConfigError, ablate


def add_config_arguments(p: argparse.ArgumentParser, *, default_preset: str = "tiny") -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None,
                     help=f"start from a preset: {', '.join(Config.preset_names())} (default: {default_preset})")
    src.add_argument("--config", help="YAML config file (for example one written by `psamf config`)")
    p.add_argument("--ablation", action="append", default=None,
                   help=f"apply a row of the paper's ablation table ({', '.join(sorted(ABLATIONS))}); repeat to "
                        "compose several")
    p.add_argument("overrides", nargs="*", default=[],
                   help="section.key=value (e.g. optim.epochs=3 run.num_workers=1)")
    p.set_defaults(default_preset=default_preset)


def load_config(args: argparse.Namespace, extra: dict | None = None) -> Config:
    """The config the arguments name: preset or file, then the ablations, then the overrides, then `extra`
    (dotted keys set by the command's own options, such as `--run-name`). Raises ConfigError naming the field."""
    if getattr(args, "config", None):
        cfg = Config.from_yaml(args.config)
    else:
        cfg = Config.from_preset(getattr(args, "preset", None) or getattr(args, "default_preset", "tiny"))
    for name in getattr(args, "ablation", None) or []:
        cfg = ablate(cfg, name)
    overrides = list(getattr(args, "overrides", None) or [])
    for key, value in (extra or {}).items():  # an option and an override of the same key must agree
        said = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == key]
        if said and said[-1] != str(value):
            raise ConfigError(f"{key} is given twice, {value!r} by the option and {said[-1]!r} as an override; "
                              "keep one")
    cfg = cfg.override(overrides)
    return cfg.replace(extra, source="command line") if extra else cfg


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 1,2,3` -> [1, 2, 3]; None or empty text -> None. Raises ConfigError on anything else."""
    if not text:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:  # a seed twice is one run: the summary would count fewer seeds than the user asked for
        raise ConfigError(f"--seeds {text}: seed(s) {', '.join(map(str, twice))} given twice; each seed is one run")
    return seeds
