"""The default run as a user runs it: wall time cold and warm, what each stage cost, and what it offers.

    python benchmarks/bench_default_run.py [--runs 2] [--no-warm | --warm-only] [key=value ...]

Each run is `python search.py [key=value ...]` in a subprocess: cold with an empty cache (a fresh
LAYERBOOST_CACHE: the model converted, the bank trained, the cost model, head scores and sensitivity measured),
then warm on the same cache with a new study (`study=<name>-warm`). `--warm-only` runs once on the user's own
cache (LAYERBOOST_CACHE or ~/.cache/layerboost), e.g. a long floor-on search: `--warm-only budget=300 --result
default_run_long`. Per run: the wall time, each stage's
seconds (the study's `last_run_stages`), and every best file: its plan, its latency measured against all-softmax
(median and the fastest and slowest round) beside the cost model's prediction, its KL and top-1 agreement at the
confirmation rung with 90% intervals, and the facts it finds there against the original's.
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
        latency = metrics.get("latency_share_measured") or {}
        retrieval = metrics.get("confirm:retrieval_acc") or {}
        best[path.stem] = {
            "plan": data["plan"], "measured_share": latency.get("value"), "interval": latency.get("interval90"),
            "rounds": latency.get("rounds"), "predicted_share": latency.get("predicted"),
            "kl": (metrics.get("confirm:kl") or {}).get("value"), "kl_interval": (metrics.get("confirm:kl") or {}).get("interval90"),
            "agreement": (metrics.get("confirm:top1_agreement") or {}).get("value"),
            "agreement_interval": (metrics.get("confirm:top1_agreement") or {}).get("interval90"),
            "retrieval": retrieval.get("value"), "retrieval_interval": retrieval.get("interval90"),
            "facts": retrieval.get("samples")}
    original = study.user_attrs.get("original_retrieval", {})
    return {"wall_s": wall, "run_dir": str(run_dir), "study": run_dir.name, "stages_s": study.user_attrs.get("last_run_stages", {}),
            "best": best, "original_proxy_retrieval": original.get("metrics", {}).get("retrieval_acc"),
            "summary_head": (run_dir / "summary.md").read_text().split("## Run")[0]}


def best_rows(run_index: int, kind: str, measured: dict) -> list[list]:
    """One table row per best file of a run."""
    return [[run_index, kind, name, pick["plan"], pick["measured_share"],
             f"[{pick['interval'][0]:.3f}, {pick['interval'][1]:.3f}]" if pick["interval"] else "",
             pick["predicted_share"], pick["kl"], pick["agreement"], pick["retrieval"], pick["facts"]]
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
            rows.append([index + 1, "warm", round(runs["warm"]["wall_s"] / 60, 2),
                         ", ".join(f"{k} {v:.0f}" for k, v in runs["warm"]["stages_s"].items())])
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
            rows.append([index + 1, kind, round(measured["wall_s"] / 60, 2),
                         ", ".join(f"{k} {v:.0f}" for k, v in measured["stages_s"].items())])
            pick_rows += best_rows(index + 1, kind, measured)
    results.table("Wall time (minutes) and stages (seconds)", ["run", "cache", "wall min", "stages s"], rows)
    results.table("Best files: latency measured against all-softmax (median of per-round ratios, [90% interval]) "
                  "beside the cost model's prediction; quality and retrieval at the confirmation rung",
                  ["run", "cache", "file", "plan", "measured share", "90%", "predicted share", "KL",
                   "top-1 agreement", "retrieval", "facts"], pick_rows)
    colds = [r[2] for r in rows if r[1] == "cold"]
    warms = [r[2] for r in rows if r[1] == "warm"]
    if colds:
        results.headline("default run, cold (minutes, slowest run)", max(colds), "min")
    if warms:
        results.headline("warm run (minutes, slowest run)", max(warms), "min")
    offered = [p for p in pick_rows if p[4] is not None]
    fastest = {(p[0], p[1]): min(q[4] for q in offered if (q[0], q[1]) == (p[0], p[1])) for p in offered}
    if fastest:
        results.headline("fastest best file, measured share of all-softmax latency (slowest of the runs)",
                         round(max(fastest.values()), 3), "x")
    else:
        results.note("no run offered a best file: no plan but the original kept the floors (see each summary)")
    results.write()


if __name__ == "__main__":
    run(main)
