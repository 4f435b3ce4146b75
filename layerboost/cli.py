"""`layerboost <verb> [key=value ...]`: every verb composes the same Hydra config (conf/) and calls one
function. Bad input ends in one line naming the field and value, exit status 2, no traceback unless
`verbose=true`. A leaf: nothing imports this module; verbs are imported only when run, so `--help` is instant.
"""
from __future__ import annotations

import importlib
import os
import sys

from layerboost_core.errors import UserError, did_you_mean, one_line_errors

# verb -> ("module:function", one-line summary). The summary is here so that `layerboost --help` imports nothing.
VERBS: dict[str, tuple[str, str]] = {
    "search": ("layerboost.verbs.search:search", "multi-objective search of per-layer attention options (= python search.py)"),
    "report": ("layerboost.verbs.report:report", "re-write a study's report; re-solve its front for another workload"),
    "transfer": ("layerboost.verbs.transfer:transfer", "train (or reuse) the bank of `linear` replacements"),
    "sensitivity": ("layerboost.verbs.sensitivity:sensitivity", "every (layer, option) swapped alone: CSV + heatmap"),
    "eval": ("layerboost.verbs.evaluate:evaluate", "proxy metrics and lm-eval scores of one plan or hybrid folder"),
    "bench": ("layerboost.verbs.bench:bench", "measured latency, decode speed and memory of a plan beside all-softmax"),
    "heal": ("layerboost.verbs.heal:heal", "distil a plan from the original model into a hybrid model folder"),
    "export": ("layerboost.verbs.export:export", "a plan as a model folder plain transformers loads (no healing)"),
}
USAGE = "usage: layerboost <verb> [key=value ...]   (layerboost <verb> --help; --cfg job prints the composed config)"


def _usage() -> str:
    lines = [USAGE, "", "verbs:"]
    lines += [f"  {name:12s} {summary}" for name, (_, summary) in VERBS.items()]
    return "\n".join(lines)


def resolve(name: str):
    """The function of verb `name` (its module imported now)."""
    module, function = VERBS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def _verb_help(name: str) -> str:
    """What the verb does, its config groups with their choices, and its main settings with defaults."""
    from .config import compose, config_groups, group_choices

    function = resolve(name)
    cfg = compose([])
    lines = [f"usage: layerboost {name} [key=value ...]", "", (function.__doc__ or "").strip(), "",
             "config groups (group=choice):"]
    for group in config_groups():
        default = cfg.get(group, {}).get("name") if group == "model" else None
        lines.append(f"  {group:10s} {', '.join(group_choices(group))}" + (f"  (default: {default})" if default else ""))
    lines += ["", "main settings (key=value, default shown):"]
    for key in getattr(function, "settings", ()):
        from omegaconf import OmegaConf

        lines.append(f"  {key} = {OmegaConf.select(cfg, key)}")
    lines += ["", "every setting: layerboost " + name + " --cfg job"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if argv else 2)
    name, args = argv[0], argv[1:]
    verbose = any(a in ("verbose=true", "verbose=True", "verbose=1") for a in args)
    one_line_errors(lambda: _run(name, args), verbose,
                    "interrupted; finished work is saved and the same command resumes it")


def _run(name: str, args: list[str]) -> None:
    """Verb `name` with its arguments: help, the composed config (--cfg), or the verb itself."""
    if name not in VERBS:
        raise UserError(f"verb: unknown value {name!r}; {did_you_mean(name, VERBS)}")
    if "-h" in args or "--help" in args:
        print(_verb_help(name))
        return
    show_config = "--cfg" in args
    overrides = [a for i, a in enumerate(args) if a != "--cfg" and not (i and args[i - 1] == "--cfg")]
    from .config import compose

    cfg = compose(overrides)
    function = resolve(name)
    if getattr(function, "adopts_plan_file", False):  # plan=<file>: the settings it was made with
        from .plan_file import adopt_plan_settings

        cfg = adopt_plan_settings(cfg, overrides, compose([]))
    if show_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg, resolve=True))
        return
    from layerboost_core.logs import setup_logging

    setup_logging(bool(cfg.verbose))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    function(cfg)
