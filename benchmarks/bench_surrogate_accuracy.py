"""How well the accuracy surrogates rank plans as trials accumulate: fit on the first N completed trials of a
study (N = 10, 20, 40, 60, ...), Spearman correlation of predicted and measured proxy quality on the rest.

    python benchmarks/bench_surrogate_accuracy.py --storage sqlite:///outputs/studies/<study>.db \
        --sensitivity outputs/runs/<study>/sensitivity.csv [--study NAME] [--metric kl] [--sizes 10,20,40]
    python benchmarks/bench_surrogate_accuracy.py --demo /tmp/surrogate-demo   # synthetic study, known truth

Columns: `sensitivity` is the plain sum of single-swap scores (no fitting; a global scale does not change
ranks, so it is also the fitted additive predictor's Spearman); `adjacent` / `all` are InteractionPredictor
with pairs of adjacent layers / of all layers. Results file `surrogate_accuracy` (`surrogate_accuracy_demo` with
`--demo`). No model is loaded; `key=value` overrides are accepted (and recorded) like every script's.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy.stats import spearmanr

from harness import Script, ints, run
from layerboost_core.plan import LayerPlan
from layerboost_search.study import PLAN_ATTR
from layerboost_surrogates.accuracy import InteractionPredictor, SensitivityTable


def load_trials(storage: str, study_name: str | None, metric: str) -> list[tuple[LayerPlan, float]]:
    """(plan, metric) of completed trials in trial order, one per distinct plan."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    out, seen = [], set()
    for trial in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        text = trial.user_attrs.get(PLAN_ATTR)
        value = trial.user_attrs.get(f"proxy:{metric}", trial.values[0])
        if text and text not in seen and np.isfinite(value):
            seen.add(text)
            out.append((LayerPlan.from_string(text), float(value)))
    return out


def load_sensitivity(path: Path, metric: str) -> list[dict]:
    """Rows from sensitivity.csv or from a sensitivity cache JSON ({"rows": [...]})."""
    if path.suffix == ".json":
        return json.loads(path.read_text())["rows"]
    with open(path, newline="") as handle:
        return [{"layer": int(r["layer"]), "option": r["option"], metric: float(r[metric])} for r in csv.DictReader(handle)]


def accuracy_curve(trials, table: SensitivityTable, sizes) -> list[dict]:
    rows = []
    for n in sizes:
        train, test = trials[:n], trials[n:]
        if len(test) < 5:
            break
        test_plans, truth = [p for p, _ in test], [v for _, v in test]
        row = {"N": n, "held_out": len(test), "sensitivity": spearmanr(table.prior(test_plans), truth).statistic}
        for pairs in ("adjacent", "all"):
            predictor = InteractionPredictor(table, pairs=pairs).fit([p for p, _ in train], [v for _, v in train])
            row[pairs] = spearmanr(predictor.predict(test_plans)[0], truth).statistic
        rows.append(row)
    return rows


def make_demo(directory: Path, num_layers: int = 16, count: int = 150, seed: int = 0) -> tuple[str, Path]:
    """A synthetic study with a known non-additive truth: sensitivities compound with the number of swapped
    layers, adjacent `none` layers interact, and measurements carry 5% noise."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"layer": layer, "option": o, "kl": float(rng.uniform(0.005, 0.05) * (5 if o == "none" else 1))}
            for layer in range(num_layers) for o in ("linear", "none")]
    table = SensitivityTable.of(rows, num_layers)
    with open(directory / "sensitivity.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["layer", "option", "kl"])
        writer.writeheader()
        writer.writerows(rows)
    (directory / "demo.db").unlink(missing_ok=True)
    storage = f"sqlite:///{(directory / 'demo.db').resolve()}"
    study = optuna.create_study(study_name="demo", storage=storage, directions=["minimize", "minimize"])
    options = ["softmax", "linear", "none"]
    distribution = optuna.distributions.CategoricalDistribution(options)
    for _ in range(count):
        plan = LayerPlan(tuple(rng.choice(options, num_layers, p=[0.5, 0.3, 0.2])))
        swapped = num_layers - plan.count("softmax")
        kl = float(table.prior([plan])[0]) * (1 + 0.05 * swapped)
        kl += sum(0.3 for a, b in zip(plan.layers, plan.layers[1:]) if a == b == "none")
        kl *= float(np.exp(0.05 * rng.standard_normal()))
        study.add_trial(optuna.trial.create_trial(
            params={f"layer_{i:03d}": o for i, o in enumerate(plan.layers)},
            distributions={f"layer_{i:03d}": distribution for i in range(num_layers)},
            values=[kl, 0.01 * swapped], user_attrs={PLAN_ATTR: str(plan), "proxy:kl": kl}))
    return storage, directory / "sensitivity.csv"


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="surrogate_accuracy", title="Accuracy predictor")
    parser = script.parser
    parser.add_argument("--storage", help="Optuna storage URL of the study")
    parser.add_argument("--study", help="study name (needed when the storage holds several)")
    parser.add_argument("--sensitivity", type=Path, help="sensitivity.csv or a sensitivity cache JSON")
    parser.add_argument("--metric", default="kl", help="proxy metric (lower is better, 0 for the original model)")
    parser.add_argument("--sizes", type=ints, default=ints("10,20,40,60,80,120,160,240,320"), help="training sizes N")
    parser.add_argument("--demo", type=Path, help="write a synthetic study and sensitivity table here and use them")
    args, _ = script.parse(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.demo:
        args.storage, args.sensitivity = make_demo(args.demo)
        args.study = "demo"
    if not args.storage or not args.sensitivity:
        parser.error("--storage and --sensitivity are required (or --demo DIR)")
    trials = load_trials(args.storage, args.study, args.metric)
    table = SensitivityTable.of(load_sensitivity(args.sensitivity, args.metric), len(trials[0][0]), args.metric)
    curve = accuracy_curve(trials, table, args.sizes)
    results = script.results("surrogate_accuracy_demo" if args.demo else None,
                             "Accuracy predictor on a synthetic study (known truth)" if args.demo else None)
    results.add_run({"distinct_plans": len(trials), "by_size": {str(r["N"]): {k: v for k, v in r.items() if k != "N"}
                                                                 for r in curve}})
    results.table(f"Spearman(predicted, measured {args.metric}) on the trials after the first N "
                  f"({len(trials)} distinct completed plans)", ["N", "held-out", "sensitivity", "adjacent", "all"],
                  [[r["N"], r["held_out"], r["sensitivity"], r["adjacent"], r["all"]] for r in curve])
    if curve:
        results.headline(f"accuracy predictor (adjacent pairs) Spearman after {curve[-1]['N']} trials",
                         round(curve[-1]["adjacent"], 3))
    results.note(f"study {args.study or '(the only one)'} in {args.storage}; sensitivity {args.sensitivity}")
    results.write()


if __name__ == "__main__":
    run(main)
