"""The one harness of the benchmarks: how a script takes its settings, and the results file it writes.

Every script reads `python benchmarks/bench_x.py [--flag ...] [key=value ...]`, in any order: `key=value` are the
CLI's own overrides (composed over conf/ with `layerboost.config.compose`, turned into typed settings with the
`layerboost.settings` functions, as the verbs do), `--flags` are the script's own knobs. A script writes
`benchmarks/results/<name>.json` (atomically): the exact command, the composed settings, the script's flags, the
commit (and whether the tree was dirty), device, dtype, torch version, date, every run's raw values, their
spread over runs, the tables and headline figures the results document shows (`benchmarks/results_doc.py`
builds benchmarks/RESULTS.md and README's headline block from these files).

    from harness import Script, run
    from layerboost.settings import workbench_settings

    def main(argv=None):
        script = Script(__doc__, __file__, result="prefill", title="Prefill speed", runs=True)
        script.parser.add_argument("--lengths", type=ints, default=(1024, 4096))
        args, cfg = script.parse(argv)
        settings = workbench_settings(cfg)
        results = script.results()
        for _ in range(args.runs):
            results.add_run({"softmax_s": ..., "linear_s": ...})   # every run's raw values, kept
        results.describe(device=torch.device("cpu"), dtype=torch.float32)
        results.table("Prefill seconds", ["length", "softmax", "linear"], [[1024, 0.31, 0.22]])
        results.headline("all-linear prefill speed-up at 4,096 tokens", 1.42, "x")
        results.write()                                  # also prints the tables

    if __name__ == "__main__":
        run(main)

Importing this module is cheap (torch and hydra load when a script parses), so results_doc.py can share its
constants.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
SCHEMA = "layerboost.results/v1"

if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a checkout that was never installed
    sys.path.insert(0, str(ROOT))


def ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of whole numbers (`--lengths 1024,4096`)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None


def floats(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers (`--targets 0.9,0.8`)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def named_plans(plans: str, best: str, n_layers: int) -> dict[str, str]:
    """{name: plan string} from `--plans NAME=PLAN,...` (a bare PLAN names itself) and `--best FILE,...` (each best
    file's plan, named `<label>:<file stem>`), every plan checked against the model's `n_layers`."""
    from layerboost_core.plan import LayerPlan

    named = {}
    for item in filter(None, (plans or "").split(",")):
        name, _, text = item.partition("=")
        named[name] = str(LayerPlan.from_string(text or name).check_layers(n_layers))
    for path in filter(None, (best or "").split(",")):
        data = json.loads(Path(path).read_text())
        label = data.get("origin", {}).get("label") or "best"
        named[f"{label}:{Path(path).stem}"] = str(LayerPlan.from_string(data["plan"]).check_layers(n_layers))
    return named


def best_settings(best: str) -> dict:
    """The option settings (mixed options' kept heads, linear settings) recorded in the first of `--best FILE,...`,
    or {}: a pick is measured with the heads it was chosen with, not ones derived again at another workload."""
    for path in filter(None, (best or "").split(",")):
        return json.loads(Path(path).read_text()).get("settings") or {}
    return {}


def with_best_settings(workbench, best: str):
    """`workbench` (WorkbenchSettings) with the option settings of the first `--best` file laid over its own
    (unchanged without one)."""
    from dataclasses import replace

    recorded = best_settings(best)
    return replace(workbench, options={**workbench.options, **recorded}) if recorded else workbench


def _override_root(item: str) -> str:
    key = item.partition("=")[0].lstrip("+~")
    return key.split(".")[0].split("@")[0]


def split_arguments(argv: Sequence[str], config_keys) -> tuple[list[str], list[str]]:
    """(script flags and their values, config overrides): an argument is an override when it is `key=value`
    whose first key part names a config key or group (`data.blocks.heldout=2`, `model=tiny:llama`); anything
    else, `--plans keep-90=LSSS...` included, is the script's."""
    flags, overrides = [], []
    for item in argv:
        if not item.startswith("-") and "=" in item and _override_root(item) in config_keys:
            overrides.append(item)
        else:
            flags.append(item)
    return flags, overrides


class Script:
    """A benchmark script's arguments: its own `--flags` (`self.parser`, argparse) plus the CLI's overrides.

    Every script gets `--result NAME` (the results file: <results dir>/<NAME>.json) and `--results-dir`;
    `runs=True` adds `--runs N` (the measurement repeated N times, every run kept in the file).
    """

    def __init__(self, doc: str, file: str, *, result: str, title: str, runs: bool = False):
        self.doc, self.file, self.default_result, self.title = doc, Path(file), result, title
        lines = (doc or "").strip().splitlines()
        self.parser = argparse.ArgumentParser(
            prog=f"python {self.script_path}", description=lines[0] if lines else None,
            epilog="\n".join(lines[1:]).strip() or None, formatter_class=argparse.RawDescriptionHelpFormatter,
            usage=f"python {self.script_path} [--flag ...] [key=value ...]")
        self.parser.add_argument("--result", default=None, metavar="NAME",
                                 help=f"name of the results file (default: {result})")
        self.parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                                 help="folder of results files (default: benchmarks/results)")
        if runs:
            self.parser.add_argument("--runs", type=int, default=1,
                                     help="repeat the whole measurement N times; every run is kept")
        self.argv: list[str] = []
        self.overrides: list[str] = []
        self.args: argparse.Namespace | None = None
        self.cfg = None

    @property
    def script_path(self) -> str:
        try:
            return str(self.file.resolve().relative_to(ROOT))
        except ValueError:
            return str(self.file)

    def parse(self, argv: Sequence[str] | None = None):
        """(flags as an argparse Namespace, the composed config). Bad overrides are a UserError (one line)."""
        from layerboost.config import compose
        from layerboost_core.errors import UserError, did_you_mean
        from layerboost_core.logs import setup_logging

        self.argv = list(sys.argv[1:] if argv is None else argv)
        keys = set(compose([]).keys())
        flags, overrides = split_arguments(self.argv, keys)
        args, unknown = self.parser.parse_known_args(flags)
        for item in unknown:
            if "=" in item and not item.startswith("-"):
                root = _override_root(item)
                raise UserError(f"argument: {item!r} is neither a --flag of this script nor a config override; "
                                f"config keys: {did_you_mean(root, keys)}")
        if unknown:
            self.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if getattr(args, "runs", 1) < 1:
            raise UserError(f"--runs: {args.runs} must be >= 1")
        self.cfg = compose(overrides)
        self.overrides = overrides  # as given: a script that runs the CLI itself passes them on
        self.args = args
        setup_logging(bool(self.cfg.verbose))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return args, self.cfg

    @property
    def command(self) -> str:
        return shlex.join(["python", self.script_path, *self.argv])

    def results(self, name: str | None = None, title: str | None = None) -> "Results":
        """The results of this run; the file is `--result`, else `name`, else the script's default."""
        if self.args is None:
            raise RuntimeError("parse() the arguments first")
        from layerboost.settings import plain

        flags = {k: v for k, v in vars(self.args).items() if k not in ("result", "results_dir")}
        return Results(self.args.result or name or self.default_result, title or self.title,
                       script=self.script_path, command=self.command, settings=plain(self.cfg), flags=flags,
                       folder=self.args.results_dir)


def _plain(value):
    """JSON-ready: tuples as lists, Paths as strings, NaN/inf as the strings 'nan'/'inf'/'-inf' (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _plain(value.item())
    return str(value)


def numeric_leaves(run: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a run, nested mappings flattened with ' / ' (lists, strings and booleans left out)."""
    out = {}
    for key, value in run.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numeric_leaves(value, f"{name} / "))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def git_state(root: Path = ROOT) -> dict:
    """The commit the tree is at and whether tracked files differ from it (None where git is not available)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if not status.returncode else None}


def open_model(cfg):
    """(LoadedModel, PlanSwitcher, WorkbenchSettings): the config's model on its device and dtype with its
    option settings, without data splits or bank (for timings on random tokens: speed does not depend on them)."""
    from layerboost.settings import workbench_settings
    from layerboost_core.models import load_model
    from layerboost_core.patch import PlanSwitcher

    settings = workbench_settings(cfg)
    m = settings.model
    loaded = load_model(m.name, m.source, m.device, m.dtype, m.fallback_source)
    return loaded, PlanSwitcher(loaded.model, settings.options), settings


def describe_device(device) -> str:
    """A torch device as the cost model names it ('NVIDIA H100 80GB HBM3', 'cpu:x86_64:2threads'); text as is."""
    import torch

    if isinstance(device, torch.device):
        from layerboost_surrogates.cost_model import device_name

        return device_name(device)
    return str(device)


def describe_dtype(dtype) -> str:
    import torch

    if isinstance(dtype, torch.dtype):
        from layerboost_core.models import dtype_name

        return dtype_name(dtype)
    return str(dtype)


class Results:
    """What one script run measured, written to `<folder>/<name>.json` by `write`."""

    def __init__(self, name: str, title: str, *, script: str, command: str, settings: dict, flags: dict,
                 folder: Path = RESULTS_DIR):
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"results name {name!r}: a plain file name is needed")
        self.name, self.title, self.script, self.command = name, title, script, command
        self.settings, self.flags, self.folder = settings, flags, Path(folder)
        self.device: str | None = None
        self.dtype: str | None = None
        self.runs: list[dict] = []
        self.summary: dict[str, dict] = {}
        self.tables: list[dict] = []
        self.headlines: list[dict] = []
        self.notes: list[str] = []

    def describe(self, device=None, dtype=None) -> None:
        """Where it ran: a torch device / dtype, or text (e.g. 'float32 and bfloat16')."""
        if device is not None:
            self.device = describe_device(device)
        if dtype is not None:
            self.dtype = describe_dtype(dtype)

    def add_run(self, values: dict) -> None:
        """One run's raw values. Its numbers (nested mappings flattened) are summarised over runs."""
        self.runs.append(values)

    def summarize(self, key: str, values) -> None:
        """An explicit summary entry: the spread of `values` (e.g. per-round ratios within runs)."""
        from layerboost_core.timing import spread

        self.summary[key] = spread(values)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence], note: str | None = None) -> None:
        """A table the results document shows: column names and rows of cells (numbers or text)."""
        for row in rows:
            if len(row) != len(columns):
                raise ValueError(f"table {title!r}: a row has {len(row)} cells for {len(columns)} columns: {row!r}")
        self.tables.append({"title": title, "columns": list(columns), "rows": [list(r) for r in rows],
                            **({"note": note} if note else {})})

    def headline(self, name: str, value, unit: str = "") -> None:
        """A figure for README's headline block (e.g. 'all-linear prefill speed-up at 4,096 tokens', 1.42, 'x')."""
        self.headlines.append({"name": name, "value": value, "unit": unit})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def spread_over_runs(self) -> dict[str, dict]:
        """Median / min / max / n over runs of every number the runs hold, then the explicit entries."""
        from layerboost_core.timing import spread

        leaves = [numeric_leaves(run) for run in self.runs]
        keys = list(dict.fromkeys(k for leaf in leaves for k in leaf))
        out = {k: spread([leaf[k] for leaf in leaves if k in leaf]) for k in keys}
        out.update(self.summary)
        return out

    def median(self, key: str):
        """The median over runs of one summarised number (a key of `spread_over_runs`), None when absent."""
        return self.spread_over_runs().get(key, {}).get("median")

    def document(self) -> dict:
        import torch

        return _plain({
            "schema": SCHEMA, "name": self.name, "title": self.title, "script": self.script,
            "command": self.command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_state(), "device": self.device, "dtype": self.dtype, "torch": torch.__version__,
            "settings": self.settings, "flags": self.flags, "runs": self.runs, "summary": self.spread_over_runs(),
            "tables": self.tables, "headline": self.headlines, "notes": self.notes,
        })

    def write(self, echo: bool = True) -> Path:
        """Write the results file atomically; with `echo`, print the tables and where the file went."""
        from layerboost_core.cache_dir import write_text

        path = self.folder / f"{self.name}.json"
        document = self.document()
        write_text(path, json.dumps(document, indent=1, allow_nan=False) + "\n")
        if echo:
            from results_doc import render_table

            for table in document["tables"]:
                print(f"\n{table['title']}\n\n{render_table(table)}")
            for line in document["notes"]:
                print(f"\nnote: {line}")
            print(f"\nresults written to {path} (python benchmarks/results_doc.py rebuilds RESULTS.md)")
        return path


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
    """Run a script's `main(argv)` as the CLI runs a verb: bad input is one line on stderr and exit status 2
    (the traceback too with verbose=true)."""
    from layerboost_core.errors import one_line_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    one_line_errors(lambda: main(argv), any(a in ("verbose=true", "verbose=True", "verbose=1") for a in argv))
