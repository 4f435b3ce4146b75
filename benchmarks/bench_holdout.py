"""A finished search's front re-measured where the search never looked: a held-out source, a longer context.

    python search.py data.source=builtin:-news                      # the search never sees the news corpus
    python benchmarks/bench_holdout.py --study <name> --source builtin:news --factor 2 data.source=builtin:-news
    python benchmarks/bench_holdout.py [--study NAME] [--source S] [--factor F] [--blocks N] [--needles N]
                                       [--targets 0.9 0.8 0.7] [--rank-by RUNG] [--max-kl K] [key=value ...]

Every feasible plan on the study's proxy front and every paper-heuristic seed plan of the same study (the
heuristic's plans at equal evaluations: the search evaluated them all) is re-measured on `--blocks` held-out
blocks of `--factor` x workload.prefill tokens of `--source` (a rung of the fidelity ladder named `holdout-...`,
kept in the study like the ladder's own rungs, so a second run measures nothing again and `layerboost report`
shows its columns). Latency is the study's predicted latency (the cost model does not depend on text).

With `--needles N` (retrieval rows: a fact planted at a random depth of the source's held-out text, queried at
the end) only the plans a user would pick are re-measured: at each `--targets` share of all-softmax latency,
the search's front plan and the heuristic's plan with the least KL at or under it (KL at `--rank-by`, a rung
already in the study, e.g. the `--factor 2` run's, else the proxy), beside all-softmax; their retrieval
exact match and answer NLL side by side (results file `holdout_retrieval`).

Without `--needles` (results file `holdout`), at the proxy and at the hold-out rung: how many front plans stay
non-dominated (among the front plans, and among front plus heuristic plans), and the hypervolume (KL vs
predicted latency, reference point 1.05 x all-softmax latency and `--max-kl`) of the search's front plans and
of the heuristic's plans, with their ratio. Pass the search's own `key=value` overrides so the same model, bank
and settings are used.
"""
from __future__ import annotations

import dataclasses
import time

import optuna

from harness import Script, run
from layerboost.settings import search_settings
from layerboost_core.pareto import hypervolume_2d
from layerboost_core.workbench import attach_bank, bank_id_or_none, open_workbench
from layerboost_search.study import LABEL_ATTR, PLAN_ATTR, storage_url, study_name
from layerboost_search.fidelity import climb, rung_scores
from layerboost_search.report import front_trials
from layerboost_search.runner import make_runner
from layerboost_search.settings import RungSettings


def non_dominated(points: dict[int, tuple[float, float]], among: dict[int, tuple[float, float]]) -> set[int]:
    """Keys of `points` that no point of `among` dominates ((latency, KL), both minimised)."""
    def beaten(p, q):
        return q[0] <= p[0] and q[1] <= p[1] and q != p
    return {n for n, p in points.items() if not any(beaten(p, q) for m, q in among.items() if m != n)}


def picks_at_targets(study, front, heuristic, softmax, targets, rank_by):
    """[(target, "search" | "heuristic" | "all-softmax", trial)]: per latency target, the front plan and the
    heuristic plan with the least KL at `rank_by` (or the highest-factor holdout rung measured) at or under it."""
    scores = rung_scores(study)
    holdouts = sorted((r for r in scores if r.startswith("holdout-")),
                      key=lambda r: next(iter(scores[r].values()))["settings"]["factor"])
    rank_by = rank_by or (holdouts[-1] if holdouts else None)
    print(f"plans picked by KL at {rank_by or 'proxy'}")

    def kl(t):
        got = scores.get(rank_by, {}).get(t.number) if rank_by else None
        return got["metrics"]["kl"] if got else t.values[0]
    reference = min(t.values[1] for t in softmax)
    picks = [(1.0, "all-softmax", softmax[0])]
    for target in targets:
        for kind, pool in (("search", front), ("heuristic", heuristic)):
            under = [t for t in pool if t.values[1] <= target * reference]
            if under:
                picks.append((target, kind, min(under, key=kl)))
            else:
                print(f"  no {kind} plan at or under {target:g} x all-softmax latency")
    return picks


def retrieval_rows(picks, measured) -> list[list]:
    """Per pick: target, where from, trial, latency, KL, retrieval exact match (and kept share of all-softmax's),
    answer NLL, plan."""
    base = measured.get(picks[0][2].number, {}).get("metrics", {})
    rows = []
    for target, kind, t in picks:
        m = measured.get(t.number, {}).get("metrics", {})
        acc, nll = m.get("retrieval_acc", float("nan")), m.get("retrieval_nll", float("nan"))
        kept = acc / base["retrieval_acc"] if base.get("retrieval_acc") else float("nan")
        rows.append([target, kind, t.number, t.values[1], m.get("kl", float("nan")), acc, kept, nll,
                     t.user_attrs[PLAN_ATTR]])
    return rows


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="holdout", title="The front on a source the search never saw")
    parser = script.parser
    parser.add_argument("--study", default=None, help="study name (default: derived from the overrides, as the search does)")
    parser.add_argument("--source", default="builtin:news", help="held-out source the search did not use")
    parser.add_argument("--factor", type=float, default=2.0, help="block length as a multiple of workload.prefill")
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--needles", type=int, default=0, help="retrieval rows of that length per plan")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.8, 0.7],
                        help="shares of all-softmax latency for the retrieval comparison (with --needles)")
    parser.add_argument("--rank-by", default=None,
                        help="rung whose KL picks the plans at each target (default: the highest-factor holdout rung "
                             "in the study, else the proxy)")
    parser.add_argument("--max-kl", type=float, default=1.0,
                        help="KL of the hypervolume's reference point (plans worse count for nothing)")
    args, cfg = script.parse(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    settings = search_settings(cfg)
    rung = RungSettings(name=f"holdout-{args.source.replace(':', '-')}-x{args.factor:g}", factor=args.factor,
                        blocks=args.blocks, source=args.source, needles=args.needles)
    settings = dataclasses.replace(settings, fidelity=dataclasses.replace(settings.fidelity, rungs=(rung,)))
    bench = attach_bank(open_workbench(settings.workbench, with_bank=False))
    name = args.study or study_name(settings, bench.info, bank_id_or_none(bench))
    study = optuna.load_study(study_name=name, storage=storage_url(settings, name))

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    front = front_trials(study)
    heuristic = [t for t in done if str(t.user_attrs.get(LABEL_ATTR, "")).startswith("heuristic")]
    softmax = [t for t in done if set(t.user_attrs.get(PLAN_ATTR, "")) == {"S"}]
    candidates = list({t.number: t for t in [*front, *heuristic, *softmax]}.values())
    print(f"study {name}: {len(done)} plans evaluated, {len(front)} on the proxy front, {len(heuristic)} heuristic")
    if args.needles:
        picks = picks_at_targets(study, front, heuristic, softmax, args.targets, args.rank_by)
        candidates = list({t.number: t for _, _, t in picks}.values())

    started = time.perf_counter()
    runner = make_runner(settings.evaluator(True), settings.runner, bench.bank)
    try:
        climb(study, runner, candidates, [rung], lambda t: t.user_attrs[PLAN_ATTR], settings.workbench.progress)
    finally:
        runner.close()
    seconds = time.perf_counter() - started
    measured_where = (f"{len(candidates)} plans re-measured at {rung.name} ({rung.blocks} block(s) of "
                      f"{rung.seq_len(settings.workload.prefill)} tokens from {rung.source}) in {seconds:.0f} s; "
                      f"study {name}: {len(done)} plans evaluated, {len(front)} on the proxy front, "
                      f"{len(heuristic)} heuristic")

    measured = rung_scores(study).get(rung.name, {})
    if args.needles:
        results = script.results("holdout_retrieval", "Retrieval of the plans a user would pick, on a held-out source")
        results.describe(bench.loaded.device, bench.loaded.dtype)
        rows = retrieval_rows(picks, measured)
        columns = ["target", "plan from", "trial", "latency s", "KL", "retrieval_acc", "kept", "retrieval_nll", "plan"]
        results.add_run({"picks": [dict(zip(columns, row)) for row in rows], "seconds": seconds})
        results.table(f"Retrieval at {rung.name} ({args.needles} needle rows)", columns, rows)
        results.note(measured_where)
        results.write()
        return
    latency = {t.number: t.values[1] for t in candidates}
    fidelities = {"proxy": {t.number: (latency[t.number], t.values[0]) for t in candidates},
                  rung.name: {n: (latency[n], measured[n]["metrics"]["kl"]) for n in latency if n in measured}}
    front_numbers = {t.number for t in front}
    heuristic_numbers = {t.number for t in heuristic}
    reference = (max(latency[t.number] for t in softmax) * 1.05 if softmax else max(latency.values()) * 1.05,
                 args.max_kl)
    per_fidelity, rows = {}, []
    for fidelity, points in fidelities.items():
        on_front = {n: p for n, p in points.items() if n in front_numbers}
        alone = non_dominated(on_front, on_front)
        with_heuristic = non_dominated(on_front, points)
        hv_search = hypervolume_2d(list(on_front.values()), reference)
        hv_heuristic = hypervolume_2d([p for n, p in points.items() if n in heuristic_numbers], reference)
        ratio = hv_search / hv_heuristic if hv_heuristic else float("inf")
        per_fidelity[fidelity] = {"front_plans": len(on_front), "front_kept": len(alone),
                                  "front_kept_with_heuristic": len(with_heuristic), "hv_search": hv_search,
                                  "hv_heuristic": hv_heuristic, "hv_ratio": ratio}
        share = max(len(on_front), 1)
        rows.append([fidelity, f"{len(alone)}/{len(on_front)} ({len(alone) / share:.0%})",
                     f"{len(with_heuristic)}/{len(on_front)} ({len(with_heuristic) / share:.0%})",
                     hv_search, hv_heuristic, ratio])
    per_plan = []
    for t in sorted(candidates, key=lambda t: t.values[1]):
        kind = "front" if t.number in front_numbers else ("heuristic" if t.number in heuristic_numbers else "softmax")
        per_plan.append([t.number, kind, t.user_attrs[PLAN_ATTR], t.values[1], t.values[0],
                         measured.get(t.number, {}).get("metrics", {}).get("kl", float("nan"))])
    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    results.add_run({"fidelity": per_fidelity, "reference": {"latency_s": reference[0], "kl": reference[1]},
                     "seconds": seconds, "plans": per_plan})
    results.table("Front plans kept non-dominated, and hypervolume of the search's front against the heuristic's",
                  ["fidelity", "front kept (front)", "front kept (+heuristic)", "HV search", "HV heuristic", "ratio"],
                  rows, note=f"hypervolume reference: latency {reference[0]:.3f} s (1.05 x all-softmax), KL "
                             f"{reference[1]:g}")
    results.table("Per plan", ["trial", "kind", "plan", "latency s", "proxy KL", "hold-out KL"], per_plan)
    results.headline(f"search front's hypervolume over the heuristic's at {rung.name}",
                     round(per_fidelity[rung.name]["hv_ratio"], 3), "x")
    results.note(measured_where)
    results.write()


if __name__ == "__main__":
    run(main)
