"""The search against the paper's heuristic at equal evaluations, re-measured on a source the search never saw.

    python benchmarks/bench_holdout.py [--source builtin:news] [--blocks 2] [--max-kl 1.0] [key=value ...]
                                       e.g. data.source=builtin:-news      (the search never sees the news corpus)

1. The default search with the given overrides (`python search.py ...`: the same study, resumed if it exists;
   its `budget` evaluations include its own seeds).
2. The paper's threshold heuristic given the same number of evaluations: a sweep of `budget` tier plans from
   the same single-swap sensitivity table, evaluated by the same proxy into a study of its own
   (`<study>-heuristic<budget>`, resumed if it exists).
3. Each method's front in (predicted speed cost, proxy KL, proxy retrieval lost) re-measured on `--blocks` blocks of
   `--source`'s held-out text at the workload's context, with the proxy's facts per block (a fidelity rung named
   `holdout-<source>`, kept in each study, so a second run measures nothing again).
4. Hypervolumes at the hold-out rung, search over heuristic: over (speed, KL) and over (speed, KL, retrieval
   lost), for the whole front and for the usable region (plans keeping the floors at the hold-out rung: top-1
   agreement >= fidelity.agreement_floor, retrieval >= objective.retrieval_floor x the original's). Speed is the
   serving cost model's cost in the searched metric (objective.speed: at the default workload, seconds per output
   token at the concurrency each plan's cache allows) as a share of all-softmax's (the same model for both), KL up
   to `--max-kl`, retrieval lost = 1 - found / the original's found, clipped to [0, 1]; reference (1.05, max KL, 1).
"""
from __future__ import annotations

import dataclasses

import optuna
from optuna.trial import TrialState

from harness import Script, run
from layerboost.settings import search_settings
from layerboost_core.pareto import hypervolume_2d, hypervolume_3d, non_dominated
from layerboost_core.plan import LayerPlan
from layerboost_core.sensitivity import cached_sensitivity_rows
from layerboost_core.workbench import attach_bank
from layerboost_search.driver import SearchRun, enqueue_seeds
from layerboost_search.fidelity import climb, rung_scores
from layerboost_search.objectives import SPEEDS, declare_objectives
from layerboost_search.pipeline import prepare, run_search, scores_by_runner, sensitivity_options, space_needs_bank
from layerboost_search.runner import make_runner
from layerboost_search.seeds import heuristic_sweep
from layerboost_search.settings import RungSettings
from layerboost_search.study import PLAN_ATTR, open_study, storage_url


def points_of(study, speed, reference_cost: float, original: float) -> dict[int, tuple[float, float, float]]:
    """{trial: (speed cost share of all-softmax's, proxy KL, retrieval lost)} of the study's completed trials."""
    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        found = t.user_attrs.get("proxy:retrieval_acc", 0.0)
        out[t.number] = (speed.cost(t.values[1]) / reference_cost, t.user_attrs["proxy:kl"], lost(found, original))
    return out


def lost(found: float, original: float) -> float:
    """The share of the original's retrieval a plan loses, in [0, 1]."""
    return min(1.0, max(0.0, 1.0 - found / original)) if original > 0 else 0.0


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="holdout", title="Search vs heuristic at equal evaluations, held-out text")
    script.parser.add_argument("--source", default="builtin:news", help="held-out source of the re-measurement")
    script.parser.add_argument("--blocks", type=int, default=2, help="blocks of the hold-out rung")
    script.parser.add_argument("--max-kl", type=float, default=1.0, help="KL of the hypervolume's reference point")
    args, cfg = script.parse(argv)
    settings = search_settings(cfg)
    # the user's command: resumes (nothing re-evaluated) when the study is complete; its run directory is named
    # by its study
    name = run_search(settings).name

    rung = RungSettings(f"holdout-{args.source.replace(':', '-').replace(',', '-')}", factor=1, blocks=args.blocks,
                        facts=settings.workbench.proxy.facts, source=args.source)
    prepared = prepare(settings)  # the search's own model, narrowed space and cost model
    bench, space, cost = prepared.bench, prepared.space, prepared.cost
    settings = dataclasses.replace(prepared.settings, fidelity=dataclasses.replace(
        settings.fidelity, rungs=(*settings.fidelity.rungs, rung)))
    if space_needs_bank(space):  # the heuristic's evaluations need the bank only where the search did
        attach_bank(bench)
    n = bench.switcher.num_layers
    speed = SPEEDS[settings.speed]
    reference_cost = cost.latency(LayerPlan.uniform("softmax", n))
    objectives = declare_objectives(settings.objective, settings.speed)
    search = optuna.load_study(study_name=name, storage=storage_url(settings, name))
    original = search.user_attrs["original_retrieval"]["metrics"]["retrieval_acc"]
    budget = len(search.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    runner = make_runner(settings.evaluator(True), settings.runner, bench.bank)
    try:
        rows = cached_sensitivity_rows(bench.scoring_key(), n, lambda jobs: scores_by_runner(runner, jobs, False),
                                       sensitivity_options(space))
        heuristic_name = f"{name}-heuristic{budget}"
        heuristic = open_study(storage_url(settings, heuristic_name), heuristic_name, objectives,
                               optuna.samplers.RandomSampler(seed=0), settings.heartbeat_interval,
                               settings.grace_period)
        plans = heuristic_sweep(rows, n, budget)
        enqueue_seeds(heuristic, space, plans)
        SearchRun(settings.objective, space, objectives, heuristic, cost, runner).run(
            len(plans), progress=settings.workbench.progress)
        fronts = {}
        for label, study in (("search", search), ("heuristic", heuristic)):
            points = points_of(study, speed, reference_cost, original)
            numbers = list(points)
            front = [numbers[i] for i in non_dominated([points[k] for k in numbers])]
            trials = [t for t in study.get_trials(deepcopy=False) if t.number in front]
            climb(study, runner, trials, [rung], lambda t: t.user_attrs[PLAN_ATTR], settings.workbench.progress)
            fronts[label] = (study, points, front)
    finally:
        runner.close()

    floor, agreement_floor = settings.objective.retrieval_floor, settings.fidelity.agreement_floor
    reference3, reference2 = (1.05, args.max_kl, 1.0), (1.05, args.max_kl)
    measured = {}
    for label, (study, points, front) in fronts.items():
        scored = rung_scores(study)[rung.name]
        found0 = next(iter(scored.values()))["original"]["retrieval_acc"]
        held_original = sum(found0) / len(found0)
        held = {k: (points[k][0], scored[k]["metrics"]["kl"],
                    lost(scored[k]["metrics"].get("retrieval_acc", 0.0), held_original)) for k in front if k in scored}
        usable = {k: p for k, p in held.items()
                  if scored[k]["metrics"]["top1_agreement"] >= agreement_floor and p[2] <= 1 - floor}
        measured[label] = {"evaluations": len(points), "front": len(front), "original_holdout_retrieval": held_original,
                           "hv2": hypervolume_2d([p[:2] for p in held.values()], reference2),
                           "hv3": hypervolume_3d(list(held.values()), reference3),
                           "hv2_usable": hypervolume_2d([p[:2] for p in usable.values()], reference2),
                           "hv3_usable": hypervolume_3d(list(usable.values()), reference3), "usable": len(usable),
                           "plans": {study.trials[k].user_attrs[PLAN_ATTR]: {"speed_share": p[0], "kl": p[1],
                                                                            "retrieval_lost": p[2]}
                                     for k, p in held.items()}}
    ratio = {key: (measured["search"][key] / measured["heuristic"][key] if measured["heuristic"][key] else float("nan"))
             for key in ("hv2", "hv3", "hv2_usable", "hv3_usable")}

    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    results.add_run({"methods": measured, "ratio": ratio, "rung": dataclasses.asdict(rung), "study": name,
                     "heuristic_study": heuristic_name})
    results.table(f"At equal evaluations ({budget} each), front re-measured on {args.blocks} block(s) of {args.source} "
                  f"({rung.facts} facts each); usable: agreement >= {agreement_floor:g}, retrieval >= {floor:.0%} of "
                  "the original's",
                  ["method", "evaluations", "front plans", "usable", f"HV ({speed.key}, KL)",
                   f"HV ({speed.key}, KL, retrieval)", f"HV usable ({speed.key}, KL)",
                   f"HV usable ({speed.key}, KL, retrieval)"],
                  [[label, m["evaluations"], m["front"], m["usable"], m["hv2"], m["hv3"], m["hv2_usable"],
                    m["hv3_usable"]] for label, m in measured.items()]
                  + [["search / heuristic", "", "", "", ratio["hv2"], ratio["hv3"], ratio["hv2_usable"],
                      ratio["hv3_usable"]]])
    if measured["heuristic"]["evaluations"] < budget:  # a threshold sweep has only so many distinct plans
        results.note(f"the heuristic's sweep has {measured['heuristic']['evaluations']} distinct plans over "
                     f"{', '.join(space.options)}: every one of them evaluated, fewer than the search's {budget}")
    results.headline(f"search / heuristic hypervolume in ({speed.label}, KL, retrieval), equal evaluations, "
                     "held-out text", round(ratio["hv3"], 3), "x")
    results.headline(f"search / heuristic hypervolume in ({speed.label}, KL), equal evaluations, held-out text",
                     round(ratio["hv2"], 3), "x")
    results.write()


if __name__ == "__main__":
    run(main)
