"""The default run as a user runs it: wall time cold and warm, what each stage cost, and what it offers.

    python benchmarks/bench_default_run.py [--runs 2] [--no-warm | --warm-only] [key=value ...]

Each run is `python search.py [key=value ...]` in a subprocess: cold with an empty cache (a fresh
LAYERBOOST_CACHE: the model converted, the bank trained, the cost model, head scores and sensitivity measured),
then warm on the same cache with a new study (`study=<name>-warm`). `--warm-only` runs once on the user's own
cache (LAYERBOOST_CACHE or ~/.cache/layerboost). Per run: the wall time, each stage's seconds and, where counted,
forward passes and tokens (the study's `last_run_stages`, summary.md), and every best file: its plan, its serving
measured against all-softmax (the searched speed metric and the others, median of per-round ratios with the
interval) beside the cost model's prediction, the sequences it serves at once, its KL and top-1 agreement at the
confirmation rung with 90% intervals, and the facts it finds there (answered by generation) against the
original's. With `workload=prefill-only` it reports today's prefill-only workload the same way.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from harness import ROOT, Script, run


def search(overrides: list[str], cache: Path, output_dir: Path) -> dict:
    """One `python search.py` run: wall seconds, its run directory, stage seconds, the best files."""
    env = {**os.environ, "LAYERBOOST_CACHE": str(cache), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(ROOT / "search.py"), *overrides, f"output_dir={output_dir}", "progress=false"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"search failed ({done.returncode}): {done.stderr[-3000:]}")
    run_dir = Path(re.search(r"^report: (\S+)", done.stdout, re.M).group(1))
    storage = re.search(r"dashboard: optuna-dashboard (\S+)", done.stdout).group(1)
    study = optuna.load_study(study_name=run_dir.name, storage=storage)
    best = {}
    for path in sorted((run_dir / "best").glob("*.json")):
        data = json.loads(path.read_text())
        metrics = data["metrics"]
        retrieval = metrics.get("confirm:retrieval_acc") or {}
        serving = {m: metrics.get(f"{m}_vs_original") or {} for m in ("throughput", "ttft", "tpot", "latency")}
        best[path.stem] = {
            "plan": data["plan"], "rounds": (serving["ttft"] or {}).get("rounds"),
            **{f"{m}_measured": v.get("value") for m, v in serving.items()},
            **{f"{m}_interval": v.get("interval90") for m, v in serving.items()},
            **{f"{m}_predicted": v.get("predicted") for m, v in serving.items()},
            "concurrency": (metrics.get("concurrency") or {}).get("value"),
            "original_concurrency": (metrics.get("concurrency") or {}).get("original"),
            "kl": (metrics.get("confirm:kl") or {}).get("value"), "kl_interval": (metrics.get("confirm:kl") or {}).get("interval90"),
            "agreement": (metrics.get("confirm:top1_agreement") or {}).get("value"),
            "agreement_interval": (metrics.get("confirm:top1_agreement") or {}).get("interval90"),
            "retrieval": retrieval.get("value"), "retrieval_interval": retrieval.get("interval90"),
            "facts": retrieval.get("samples"),
            # the option settings it was picked with (mixed layers' kept heads): what re-serving it elsewhere needs
            "settings": data.get("settings")}
    answer = json.loads((run_dir / "answer.json").read_text())
    original = study.user_attrs.get("original_retrieval", {})
    summary = (run_dir / "summary.md").read_text()
    stages = next((line for line in summary.splitlines() if line.startswith("- this run's stages: ")), "")
    # Issue 29: a run that reaches its budget leaves no plan queued but the seeds it had no room for (summary.md)
    states = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)}
    return {"wall_s": wall, "run_dir": str(run_dir), "study": run_dir.name,
            "stages_s": study.user_attrs.get("last_run_stages", {}), "stages": stages.removeprefix("- this run's stages: "),
            "best": best, "speed": answer.get("speed", {}).get("metric"), "unmet": answer.get("unmet", []),
            "fastest_keeping_floors": answer.get("fastest_keeping_floors"),
            "original_proxy_retrieval": original.get("metrics", {}).get("retrieval_acc"),
            "trials": states, "queued_line": next((line for line in summary.splitlines()
                                                   if line.startswith("- queued, not evaluated")), ""),
            "summary_head": summary.split("## Run")[0]}


def best_rows(run_index: int, kind: str, measured: dict) -> list[list]:
    """One table row per best file of a run."""
    def ratio(pick, metric):
        value, interval = pick[f"{metric}_measured"], pick[f"{metric}_interval"]
        if value is None:
            return ""
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}"

    return [[run_index, kind, name, pick["plan"], pick["concurrency"], pick["original_concurrency"],
             ratio(pick, "throughput"), pick["throughput_predicted"], ratio(pick, "ttft"), pick["ttft_predicted"],
             ratio(pick, "latency"), pick["latency_predicted"], pick["kl"], pick["agreement"], pick["retrieval"],
             pick["facts"]]
            for name, pick in measured["best"].items()]


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="default_run", title="The default run, cold and warm", runs=True)
    script.parser.add_argument("--no-warm", action="store_true", help="cold runs only")
    script.parser.add_argument("--warm-only", action="store_true", help="one run on the user's own cache")
    args, cfg = script.parse(argv)
    results = script.results()
    from layerboost.settings import workbench_settings
    from layerboost_core.models import resolve_device, resolve_dtype

    device = resolve_device(workbench_settings(cfg).model.device)
    results.describe(device, resolve_dtype(workbench_settings(cfg).model.dtype, device))
    overrides = list(script.overrides)
    rows, pick_rows = [], []
    for index in range(args.runs):
        if args.warm_only:
            from layerboost_core.cache_dir import cache_root

            with tempfile.TemporaryDirectory(prefix="layerboost-run-") as folder:
                runs = {"warm": search(overrides, cache_root(), Path(folder) / "outputs")}
            print(f"run {index + 1}: {runs['warm']['wall_s'] / 60:.1f} min")
            results.add_run(runs)
            rows.append([index + 1, "warm", round(runs["warm"]["wall_s"] / 60, 2), runs["warm"]["stages"],
                         ", ".join(f"{state} {n}" for state, n in runs["warm"]["trials"].items())])
            pick_rows += best_rows(index + 1, "warm", runs["warm"])
            continue
        with tempfile.TemporaryDirectory(prefix="layerboost-cold-") as folder:
            cache, output_dir = Path(folder) / "cache", Path(folder) / "outputs"
            cold = search(overrides, cache, output_dir)
            print(f"run {index + 1} cold: {cold['wall_s'] / 60:.1f} min")
            runs = {"cold": cold}
            if not args.no_warm:
                runs["warm"] = search([*overrides, f"study={cold['study']}-warm"], cache, output_dir)
                print(f"run {index + 1} warm: {runs['warm']['wall_s'] / 60:.1f} min")
        results.add_run(runs)
        for kind, measured in runs.items():
            rows.append([index + 1, kind, round(measured["wall_s"] / 60, 2), measured["stages"],
                         ", ".join(f"{state} {n}" for state, n in measured["trials"].items())])
            pick_rows += best_rows(index + 1, kind, measured)
    results.table("Wall time (minutes), and each stage's seconds with the forward passes and tokens it ran",
                  ["run", "cache", "wall min", "stages", "trials at the end"], rows)
    results.table("Best files: serving measured against all-softmax (median of per-round ratios [90% interval]), each "
                  "at the concurrency its cache allows, beside the cost model's prediction; quality and retrieval at "
                  "the confirmation rung (facts answered by generation)",
                  ["run", "cache", "file", "plan", "sequences at once", "original's", "throughput x", "predicted",
                   "TTFT x", "predicted", "request latency x", "predicted", "KL", "top-1 agreement", "retrieval",
                   "facts"], pick_rows)
    colds = [r[2] for r in rows if r[1] == "cold"]
    warms = [r[2] for r in rows if r[1] == "warm"]
    if colds:
        results.headline("default run, cold (minutes, slowest run)", max(colds), "min")
    if warms:
        results.headline("warm run (minutes, slowest run)", max(warms), "min")
    speed = next((m["speed"] for run in results.runs for m in run.values()), None)
    key = {"throughput": 6, "latency": 10, "ttft": 8}.get(speed)
    offered = [p for p in pick_rows if key is not None and p[key]]
    offering = {(p[0], p[1]) for p in pick_rows}  # a run that offered nothing has no row: say how many did
    results.headline("runs that offered a best file", f"{len(offering)} of {len(rows)}", "")
    if offered:  # the fastest best file of each run that offered one (in the searched metric), its worst run
        values = {}
        for p in offered:
            value = float(p[key].split()[0])
            best = values.get((p[0], p[1]))
            if best is None or (value > best if speed == "throughput" else value < best):
                values[(p[0], p[1])] = value
        worst = min(values.values()) if speed == "throughput" else max(values.values())
        label = "output tokens/s over all-softmax's" if speed == "throughput" else f"{speed} share of all-softmax's"
        results.headline(f"fastest best file, measured {label} (slowest of the runs that offered one)",
                         round(worst, 3), "x")
    else:
        results.note("no run offered a best file: no plan but the original kept the floors (see each summary)")
    results.write()


if __name__ == "__main__":
    run(main)
