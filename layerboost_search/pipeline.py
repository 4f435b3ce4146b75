"""The search pipeline from typed settings: model and bank, cost model, sensitivity, seeds, the study, the
fidelity ladder, lm-eval and the report (`run_search`); and re-reporting an existing study (`report_study`)."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from optuna.trial import TrialState

from layerboost_core.errors import UserError
from layerboost_core.families import layer_kinds
from layerboost_core.plan import LayerPlan
from layerboost_core.sensitivity import cached_sensitivity_rows, sensitivity_heatmap
from layerboost_core.space import SearchSpace
from layerboost_core.tables import write_csv
from layerboost_core.head_scores import head_score_rows
from layerboost_core.workbench import attach_bank, attach_head_choices, bank_id_or_none, needs_bank, open_workbench
from layerboost_core.workload import Workload
from layerboost_surrogates.cost_model import cost_model, kv_bytes_per_sequence

from .driver import SearchRun, enqueue_seeds
from .fidelity import climb, ladder_candidates, rung_blocks
from .latency import measure_latencies
from .objectives import declare_objectives, needs_retrieval
from .picks import KEEP_BARS, LATENCY_TARGETS, floors_of, retrieval_floor
from .report import ORIGINAL_ATTR, front_trials, write_report
from .runner import make_runner
from .seeds import retrieval_critical, seed_plans
from .space import narrow
from .settings import EvalSettings, FidelitySettings, SearchSettings
from .study import PLAN_ATTR, fail_stale, lm_eval_scores, open_study, record_lm_eval, storage_url, study_name

log = logging.getLogger(__name__)

WORKLOAD_ATTR = "workload"  # study user attr: the workload the study's latencies were predicted for
STAGES_ATTR = "last_run_stages"  # study user attr: {stage: wall seconds} of the last run_search on it
SPACE_ATTR = "searched_options"  # study user attr: the options the study searches (the space once narrowed)


def scores_by_runner(runner, jobs: dict, progress: bool) -> dict:
    """Evaluate {key: plan} on the runner pool; returns {key: result}."""
    from tqdm.auto import tqdm

    results = {}
    for key, plan in jobs.items():
        runner.submit(key, "evaluate", str(plan))
    for _ in tqdm(range(len(jobs)), desc="sensitivity", unit="swap", disable=not progress):
        key, result = runner.next_result()
        results[key] = result
    return results


def open_for_space(settings: SearchSettings):
    """(workbench, space) with the bank attached only when the space can use a trainable option."""
    bench = open_workbench(settings.workbench, with_bank=False)
    space = SearchSpace.from_mapping(settings.space, bench.switcher.num_layers)
    return bench, space


@dataclass
class Prepared:
    """A search's model and data, the space it runs over (narrowed: space.narrow), and its cost model: the
    settings carry the narrowed options and the mixed options' kept heads, so the study's name and every
    evaluator follow them."""

    settings: SearchSettings
    bench: object  # layerboost_core.workbench.Workbench
    space: SearchSpace
    cost: object  # AdditiveCostModel at the workload
    notes: list[str]  # one line per option not searched, and why


def prepare(settings: SearchSettings, stage=None) -> Prepared:
    """Open the model and data, drop the options this model cannot run, measure what the others cost at the
    workload (cached per device) and drop those no cheaper than softmax (`space.prune_dominated`)."""
    stage = stage or Stages()
    with stage("model and data"):
        bench, space = open_for_space(settings)
    facts = settings.workbench.proxy.facts
    space, notes = narrow(space, bench.model.config, facts)
    with stage("head scores"):
        attach_head_choices(bench, space_options(space))  # a `mixed` option's kept heads, before anything is priced
    with stage("cost model"):
        cost = cost_model(bench.switcher, bench.info, bench.settings.options, settings.workload,
                          options=priced_options(space))
    kv = None
    if settings.objective.memory:  # whole-model KV of each uniform plan (a one-layer price misses Gemma's local layers)
        n = bench.switcher.num_layers
        kv = {o: kv_bytes_per_sequence(LayerPlan.uniform(o, n), bench.model.config, bench.settings.options,
                                       settings.workload.context, bench.model.dtype.itemsize) for o in space.options}
    space, dominated = narrow(space, bench.model.config, facts, cost, kv, settings.space.get("prune_dominated", True))
    for note in notes + dominated:
        log.info("not searched: %s", note)
    # The study is named by the space asked for, not by this machine's timings (drivers on other machines, or
    # after the cost cache is cleared, would narrow differently): its first driver records what it searches.
    return Prepared(replace(settings, workbench=bench.settings), bench, space, cost, notes + dominated)


def searched_space(study, space: SearchSpace) -> SearchSpace:
    """The options `study` searches: those its first driver narrowed to (kept in its user attrs), so every
    driver and `layerboost report` sample and read the same distributions; this driver's own narrowing when the
    study has none yet (it is recorded)."""
    searched = study.user_attrs.get(SPACE_ATTR)
    if searched is None:
        study.set_user_attr(SPACE_ATTR, list(space.options))
        return space
    if tuple(searched) != space.options:
        log.warning("study %s searches %s (its first driver's narrowing); here the measurements would give %s",
                    study.study_name, ", ".join(searched), ", ".join(space.options))
        space = replace(space, options=tuple(searched))
        space.check_consistent()
    return space


def space_options(space: SearchSpace) -> set[str]:
    """Every option a plan of the space can use: the allowed ones and the pinned ones."""
    return {*space.options, *space.pinned.values()}


def priced_options(space: SearchSpace) -> tuple[str, ...]:
    """The options the cost model times: the space's, and softmax and none (its reference and its base)."""
    return tuple(sorted(space_options(space) | {"softmax", "none"}))


def space_needs_bank(space: SearchSpace) -> bool:
    return needs_bank(space_options(space))


class Stages:
    """Wall seconds of each stage of this run, in order: logged as each ends, kept in the study (`last_run_stages`)
    and shown in summary.md, so a user sees what the run spent where."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        log.info("%s: %.0f s", name, self.seconds[name])


def run_search(settings: SearchSettings) -> Path:
    """The whole search for `settings` (its Optuna sampler built from `settings.sampler`); returns the run
    directory."""
    stage = Stages()
    objectives = declare_objectives(settings.objective)
    sampler = settings.build_sampler()  # a bad sampler is refused before minutes of loading and training
    if needs_retrieval(settings.objective) and not settings.workbench.proxy.facts:
        raise UserError(f"proxy.facts: 0, but objective.retrieval={settings.objective.retrieval} reads "
                        "retrieval_acc; set proxy.facts >= 1 or objective.retrieval=off")
    # The bank (minutes when cold) comes after every check that can refuse the run: the space needs only the
    # layer count, and the cost model only the modules' shapes (timing does not depend on trained weights).
    prepared = prepare(settings, stage)
    settings, bench, space, cost = prepared.settings, prepared.bench, prepared.space, prepared.cost
    workload, options = settings.workload, settings.workbench.options
    info, n = bench.info, bench.switcher.num_layers
    softmax_latency = cost.latency(LayerPlan.uniform("softmax", n))
    ceiling = settings.objective.latency_ceiling
    fastest = cost.fastest(space.options)
    if ceiling is not None and ceiling < fastest:
        raise UserError(f"objective.latency_ceiling: {ceiling} s cannot be met; the fastest plan in the space is "
                        f"predicted at {fastest:.3f} s (all-softmax {softmax_latency:.3f} s) for this workload")
    _check_rungs(settings, bench)  # a rung the held-out text cannot fill is refused now, not after the search
    with_bank = space_needs_bank(space)
    if with_bank:
        with stage("bank"):
            attach_bank(bench)
    bank_id = bank_id_or_none(bench)

    name = study_name(settings, info, bank_id)
    url = storage_url(settings, name)
    study = open_study(url, name, objectives, sampler, settings.heartbeat_interval, settings.grace_period)
    if WORKLOAD_ATTR not in study.user_attrs:  # what `layerboost report` compares a new workload against
        study.set_user_attr(WORKLOAD_ATTR, asdict(workload))
    space = searched_space(study, space)
    run_dir = Path(settings.output_dir) / "runs" / name
    fail_stale(study)  # trials whose driver stopped (other drivers' live trials are left running)

    progress = settings.workbench.progress
    with stage("evaluators"):
        runner = make_runner(settings.evaluator(with_bank), settings.runner, bench.bank)
    try:
        with stage("evaluators"):
            floor = _retrieval_floor(settings, study, runner)  # the first answer waits for every worker to load
        with stage("sensitivity"):
            rows = cached_sensitivity_rows(
                bench.scoring_key(), n,
                lambda jobs: scores_by_runner(runner, jobs, progress), sensitivity_options(space))
        write_csv(run_dir / "sensitivity.csv", rows)
        if bench.head_scores is not None:
            write_csv(run_dir / "head_scores.csv", head_score_rows(bench.head_scores))
        sensitivity_heatmap(rows, run_dir / "sensitivity.html", title=f"{info['name']}: single-layer swaps")
        critical = retrieval_critical(rows, floor if settings.objective.retrieval == "floor" else None)
        if critical:
            log.info("retrieval needs softmax at %s (each swap alone loses the floor): seeds and surrogate keep them",
                     ", ".join(f"layer {layer} ({option})" for layer, option in sorted(critical)))
        seeded = enqueue_seeds(study, space, seed_plans(rows, n, space=space, cost=cost, critical=critical))
        if seeded:
            log.info("enqueued %d seed plans", seeded)
        context_for_plan = {"model_config": bench.model.config, "option_settings": options,
                            "bytes_per_value": bench.model.dtype.itemsize}
        surrogate = make_surrogate_feed(settings, space, cost, rows, objectives, context_for_plan, critical)
        search = SearchRun(settings.objective, workload.context, space, objectives, study, cost, runner,
                           context_for_plan, surrogate, floor if settings.objective.retrieval == "floor" else None)
        with stage("search"):
            search.run(settings.budget, progress=progress)
        with stage("confirmation"):
            candidates = _climb_fidelity_ladder(settings.fidelity, study, runner, softmax_latency, progress)
        with stage("lm-eval"):
            _score_front_with_lm_eval(settings.eval, study, runner, softmax_latency, settings.fidelity, progress)
    finally:
        runner.close()
    # Timed only now, with the evaluators gone: a measured latency is the plan's alone, not a share of the CPU.
    with stage("latency"):
        measure_latencies(study, bench.switcher, candidates, workload, settings.fidelity.latency_rounds, cost,
                          settings.seed)
    study.set_user_attr(STAGES_ATTR, stage.seconds)

    context = {"model": info, "settings": options, "bank_id": bank_id, "workload": asdict(workload),
               "layer_kinds": layer_kinds(bench.model), "stages": stage.seconds, "not_searched": prepared.notes,
               "study": name, "storage": url, "softmax_latency": softmax_latency}
    printed = write_report(study, objectives, run_dir, context, settings.fidelity.rungs, settings.fidelity.pick_rung,
                           floors_of(settings.fidelity, settings.objective, _original(study)))
    print(f"\nSearch {name}: {len(front_trials(study))} plans on the proxy front; all-softmax predicted at "
          f"{softmax_latency:.3f} s\n")
    print(printed)
    print(f"\nreport: {run_dir}   dashboard: optuna-dashboard {url}")
    return run_dir


def _check_rungs(settings: SearchSettings, bench) -> None:
    """Cut and plant every fidelity rung's blocks once (tokenising held-out text: seconds), so that a rung asking
    for more text than there is, or more facts than its blocks hold, is one UserError before any training."""
    if settings.fidelity.top_k <= 0:
        return
    w = settings.workbench
    for rung in settings.fidelity.rungs:
        rung_blocks(bench.loaded.tokenizer, list(settings.fidelity.rungs), rung.name, w.data, w.workload.prefill,
                    w.proxy.fact_seed)


def _original(study) -> dict | None:
    """The original model's own retrieval metrics at the proxy, as the study recorded them."""
    return (study.user_attrs.get(ORIGINAL_ATTR) or {}).get("metrics")


def _retrieval_floor(settings: SearchSettings, study, runner) -> float | None:
    """The retrieval_acc a plan must keep (None: no floor). The original's own retrieval on the proxy's facts
    comes from an evaluator, which measured it while caching the reference (no forward), and is kept in the
    study's user attrs, so resumed and concurrent drivers use the same floor; where the original cannot
    retrieve, the run says so and applies none (picks.retrieval_floor)."""
    if ORIGINAL_ATTR not in study.user_attrs:
        runner.submit("original", "original", "")
        _, result = runner.next_result()
        if "error" in result:
            raise UserError(f"proxy.facts: the original model's retrieval could not be measured ({result['error']})")
        study.set_user_attr(ORIGINAL_ATTR, result)
    original = _original(study)
    floor, note = retrieval_floor(settings.objective, original)
    if note:
        log.warning(note)
    elif floor is not None:
        log.info("retrieval: the original finds %.0f%% of the %d facts planted at the proxy; plans%s must keep "
                 "retrieval_acc >= %.3f (%.0f%% of it)", 100 * original["retrieval_acc"],
                 study.user_attrs[ORIGINAL_ATTR].get("facts", 0),
                 "" if settings.objective.retrieval == "floor" else " offered as best", floor,
                 100 * settings.objective.retrieval_floor)
    return floor


def sensitivity_options(space: SearchSpace) -> tuple[str, ...]:
    """The options swapped one layer at a time: `none` always (the paper's score, what seeds rank layers by),
    and every other option the space can use but softmax (those with trained parts need the bank)."""
    return tuple(sorted(space_options(space) - {"softmax"} | {"none"}))


def make_surrogate_feed(settings: SearchSettings, space, cost, sensitivity_rows, objectives, context_for_plan,
                        critical=frozenset()):
    """The search's surrogate feed (None when `surrogate.enabled=false`); it proposes no plan holding a
    `critical` (layer, option) choice (one that alone loses the retrieval floor, seeds.retrieval_critical)."""
    from layerboost_surrogates.solver import kv_per_layer

    from .surrogate_feed import SurrogateFeed

    kv = kv_per_layer(set(space.options) | set(space.pinned.values()), context_for_plan["model_config"],
                      context_for_plan["option_settings"], settings.workload.context,
                      context_for_plan["bytes_per_value"])
    return SurrogateFeed.maybe(settings.surrogate, space, cost, sensitivity_rows, objectives, settings.objective, kv,
                               critical)


def _candidates(study, k: int, f: FidelitySettings, softmax_latency: float) -> list:
    """The `k` proxy-front trials a best-plan file could name (fidelity.ladder_candidates), among those whose
    proxy agreement keeps the quality floor: the others could never be offered."""
    return ladder_candidates(front_trials(study), k, KEEP_BARS, LATENCY_TARGETS, softmax_latency, f.agreement_floor)


def _climb_fidelity_ladder(f: FidelitySettings, study, runner, softmax_latency: float, progress: bool) -> list:
    """The candidates, re-measured at every rung (resumable: what the study already holds is skipped)."""
    if f.top_k <= 0:
        return []
    candidates = _candidates(study, f.top_k, f, softmax_latency)
    if f.rungs:
        climb(study, runner, candidates, f.rungs, lambda t: t.user_attrs[PLAN_ATTR], progress)
    return candidates


def _score_front_with_lm_eval(e: EvalSettings, study, runner, softmax_latency: float, f: FidelitySettings,
                              progress: bool) -> None:
    """lm-eval tasks for the first `eval.top_k` candidates (the ladder's order) not scored yet (resumable)."""
    top_k, tasks = e.top_k, list(e.tasks)
    if top_k <= 0 or not tasks:
        return
    front = _candidates(study, top_k, f, softmax_latency)
    scored = lm_eval_scores(study)
    todo = [t for t in front if t.number not in scored]
    if not todo:
        return
    from tqdm.auto import tqdm

    log.info("lm-eval: scoring %d front candidate(s) on %s (%s examples each)", len(todo), ", ".join(tasks),
             e.limit or e.n_examples)
    for trial in todo:
        runner.submit(trial.number, "lm_eval", trial.user_attrs[PLAN_ATTR])
    for _ in tqdm(todo, desc="lm-eval", unit="plan", disable=not progress):
        number, result = runner.next_result()
        if "error" in result:
            log.warning("lm-eval of trial %d failed: %s", number, result["error"])
            continue
        record_lm_eval(study, number, result["scores"])


def report_study(settings: SearchSettings) -> Path:
    """Re-write the report files of an existing study. With a workload other than the study's, also re-solve
    its front for that workload (nothing re-evaluated). Returns the run directory."""
    import optuna

    objectives = declare_objectives(settings.objective)
    prepared = prepare(settings)
    settings, bench, space = prepared.settings, prepared.bench, prepared.space
    if space_needs_bank(space):
        attach_bank(bench)
    name = study_name(settings, bench.info, bank_id_or_none(bench))
    url = storage_url(settings, name)
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise UserError(f"study: no study {name!r} in {url}; run the search first"
                        + _other_studies_hint(settings, name)) from None
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UserError(f"study: {name!r} has no completed trials yet")
    space = searched_space(study, space)
    asked = asdict(settings.workload)
    searched = study.user_attrs.get(WORKLOAD_ATTR, asked)
    options = settings.workbench.options
    cost = cost_model(bench.switcher, bench.info, options, Workload(**searched), options=priced_options(space))
    run_dir = Path(settings.output_dir) / "runs" / name
    context = {"model": bench.info, "settings": options, "bank_id": bank_id_or_none(bench),
               "workload": searched, "study": name, "storage": url, "layer_kinds": layer_kinds(bench.model),
               "not_searched": prepared.notes,
               "softmax_latency": cost.latency(LayerPlan.uniform("softmax", bench.switcher.num_layers))}
    print(write_report(study, objectives, run_dir, context, settings.fidelity.rungs, settings.fidelity.pick_rung,
                       floors_of(settings.fidelity, settings.objective, _original(study))))
    print(f"report: {run_dir}")
    if asked != searched:
        _resolve_for_workload(settings, bench, space, study, objectives, run_dir)
    return run_dir


def _other_studies_hint(settings: SearchSettings, name: str) -> str:
    """A hint naming the studies that do exist (a changed workload changes the derived study name)."""
    if settings.storage:
        return ""
    folder = Path(settings.output_dir) / "studies"
    others = sorted(p.stem for p in folder.glob("*.db") if p.stem != name)
    return f" (studies in {folder}: {', '.join(others)}; pick one with study=<name>)" if others else ""


def _resolve_for_workload(settings: SearchSettings, bench, space, study, objectives, run_dir: Path) -> None:
    from layerboost_core.sensitivity import cached_sensitivity

    from .resolve import resolve_front, workload_tag

    started = time.perf_counter()
    options = settings.workbench.options
    workload = asdict(settings.workload)
    cost = cost_model(bench.switcher, bench.info, options, settings.workload, options=priced_options(space))
    proxy = bench.proxy_evaluator()  # only used if the sensitivity cache is gone
    rows = cached_sensitivity(bench.switcher, proxy, bench.scoring_key(),
                              progress=settings.workbench.progress, options=sensitivity_options(space))
    out_dir = run_dir / "workloads" / workload_tag(workload)
    o = settings.objective
    table = resolve_front(study, objectives, space, cost, rows, bench.model.config, options,
                          bench.model.dtype.itemsize, workload, out_dir, o.latency_ceiling, o.memory_ceiling)
    print(f"\nfront re-solved for workload {workload} ({time.perf_counter() - started:.1f} s, "
          f"nothing re-evaluated):\n{table}\nwritten to {out_dir}")
