"""The search pipeline from typed settings: model and bank, cost model, sensitivity, seeds, the study, the
fidelity ladder, lm-eval and the report (`run_search`); and re-reporting an existing study (`report_study`)."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from optuna.study import StudyDirection
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
from layerboost_surrogates.serving_cost import serving_cost_model

from .driver import SearchRun, enqueue_seeds
from .fidelity import climb, is_original, ladder_candidates, rung_blocks, screened_pool
from .objectives import SPEEDS, declare_objectives, keeps_floors_at_proxy, needs_retrieval, speed_of
from .picks import KEEP_BARS, floors_of, retrieval_floor
from .speed import measure_serving
from .report import ORIGINAL_ATTR, front_trials, speed_of_study, write_report
from .runner import make_runner
from .seeds import retrieval_critical, seed_plans
from .space import narrow
from .settings import SearchSettings
from .study import FEASIBLE_ATTR, PLAN_ATTR, fail_stale, lm_eval_scores, open_study, record_lm_eval, storage_url, study_name

log = logging.getLogger(__name__)

WORKLOAD_ATTR = "workload"  # study user attr: the workload the study's latencies were predicted for
STAGES_ATTR = "last_run_stages"  # study user attr: {stage: wall seconds} of the last run_search on it
SPACE_ATTR = "searched_options"  # study user attr: the options the study searches (the space once narrowed)
MADE_WITH_ATTR = "made_with"  # study user attr: the workbench settings its plans were measured with (plan JSON)


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
    cost: object  # ServingCostModel at the workload, pricing plans by the searched speed metric
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
        cost = serving_cost_model(bench.switcher, bench.info, bench.settings.options, settings.workload,
                                  priced_options(space), speed=settings.speed)
    stage.add("cost model", cost.measured_work)
    # Cache bytes decide when they limit the concurrency (a memory budget), are an objective or have a ceiling.
    kv_matters = (settings.workload.memory_bound or settings.objective.memory
                  or settings.objective.memory_ceiling is not None
                  or settings.objective.ceilings.get("kv_bytes") is not None)
    space, dominated = narrow(space, bench.model.config, facts, cost, kv_matters,
                              settings.space.get("prune_dominated", True))
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
    and shown in summary.md, so a user sees what the run spent where; and, where counted, the forward passes and
    tokens a stage ran (`work`): what a slower machine pays in proportion, where seconds only say this one's."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.work: dict[str, dict] = {}

    def count(self, name: str, items, blocks: int, tokens_per_block: int):
        """Record `len(items)` evaluations of `blocks` blocks of `tokens_per_block` tokens under stage `name`;
        returns `items` (so it wraps a call)."""
        forwards = len(items) * int(blocks)
        self.add(name, {"forwards": forwards, "tokens": forwards * int(tokens_per_block)})
        return items

    def add(self, name: str, work: dict | None) -> None:
        """Record `work` ({"forwards", "tokens"}, or None: nothing) under stage `name`."""
        if not work:
            return
        mine = self.work.setdefault(name, {"forwards": 0, "tokens": 0})
        mine["forwards"] += int(work["forwards"])
        mine["tokens"] += int(work["tokens"])

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
    objectives = declare_objectives(settings.objective, settings.speed)
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
    reference = reference_serving(cost, n)
    _check_ceilings(settings, cost, space)
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
    if MADE_WITH_ATTR not in study.user_attrs:  # what its best files were made with (a report may ask otherwise)
        study.set_user_attr(MADE_WITH_ATTR, settings.workbench.record())
    space = searched_space(study, space)
    run_dir = Path(settings.output_dir) / "runs" / name
    fail_stale(study)  # trials whose driver stopped (other drivers' live trials are left running)

    progress = settings.workbench.progress
    proxy_tokens = settings.workbench.data.blocks.get("heldout") or 0, settings.workbench.data.heldout_seq_len
    with stage("evaluators"):
        runner = make_runner(settings.evaluator(with_bank), settings.runner, bench.bank)
    try:
        with stage("evaluators"):
            floor = _retrieval_floor(settings, study, runner)  # the first answer waits for every worker to load
        with stage("sensitivity"):
            rows = cached_sensitivity_rows(
                bench.scoring_key(), n,
                lambda jobs: stage.count("sensitivity", scores_by_runner(runner, jobs, progress), *proxy_tokens),
                sensitivity_options(space))
        write_csv(run_dir / "sensitivity.csv", rows)
        if bench.head_scores is not None:
            write_csv(run_dir / "head_scores.csv", head_score_rows(bench.head_scores))
        sensitivity_heatmap(rows, run_dir / "sensitivity.html", title=f"{info['name']}: single-layer swaps")
        facts = int(study.user_attrs[ORIGINAL_ATTR].get("facts", 0))  # planted in the proxy's blocks
        critical = retrieval_critical(rows, floor if settings.objective.retrieval == "floor" else None, facts)
        if critical:
            log.info("retrieval needs softmax at %s (each swap alone loses the floor): seeds and surrogate keep them",
                     ", ".join(f"layer {layer} ({option})" for layer, option in sorted(critical)))
        seeded = enqueue_seeds(study, space, seed_plans(rows, n, space=space, cost=cost, critical=critical))
        if seeded:
            log.info("enqueued %d seed plans", seeded)
        surrogate = make_surrogate_feed(settings, space, cost, rows, objectives, critical)
        search = SearchRun(settings.objective, space, objectives, study, cost, runner, surrogate,
                           floor if settings.objective.retrieval == "floor" else None, facts)
        with stage("search"):
            before = search.completed()
            search.run(settings.budget, progress=progress)
            stage.count("search", range(search.completed() - before), *proxy_tokens)
        with stage("confirmation"):
            candidates = _climb_fidelity_ladder(settings, study, runner, reference, cost, progress, stage)
        with stage("lm-eval"):
            _score_front_with_lm_eval(settings, study, runner, reference, cost, progress)
    finally:
        runner.close()
    # Timed only now, with the evaluators gone: a measured speed is the plan's alone, not a share of the CPU.
    with stage("serving"):
        served = _servable(study, candidates, settings)
        stage.add("serving", measure_serving(study, bench.switcher, served, workload, settings.fidelity.serving_rounds,
                                             cost, settings.seed))
    study.set_user_attr(STAGES_ATTR, stage.seconds)

    context = {"model": info, "settings": options, "bank_id": bank_id, "workload": asdict(workload),
               "made_with": study.user_attrs[MADE_WITH_ATTR], "layer_kinds": layer_kinds(bench.model),
               "stages": stage.seconds, "work": stage.work, "not_searched": prepared.notes, "study": name,
               "storage": url, "reference": reference}
    printed = write_report(study, objectives, run_dir, context, settings.fidelity.rungs, settings.fidelity.pick_rung,
                           floors_of(settings.fidelity, settings.objective, _original(study)))
    speed = SPEEDS[settings.speed]
    print(f"\nSearch {name}: {len(front_trials(study))} plans on the proxy front; all-softmax predicted at "
          f"{reference[speed.column]:.4g} {speed.unit} ({speed.label})\n")
    print(printed)
    print(f"\nreport: {run_dir}   dashboard: optuna-dashboard {url}")
    return run_dir


def reference_serving(cost, num_layers: int) -> dict:
    """All-softmax's predicted serving (what every share in the report is of), as trial-attr-like values."""
    plan = LayerPlan.uniform("softmax", num_layers)
    served = cost.predict(plan)
    return {"ttft_s": served.ttft_s, "tpot_s": served.tpot_s, "throughput_tok_s": served.throughput,
            "latency_s": served.latency_s, "concurrency": served.concurrency, "kv_bytes": cost.kv_bytes(plan)}


def _check_ceilings(settings: SearchSettings, cost, space) -> None:
    """A latency ceiling no plan of the space can meet is refused before any training."""
    ceiling = settings.objective.latency_ceiling
    if ceiling is None:
        return
    latency = cost.with_speed("latency")
    fastest = latency.fastest(space.options)
    if ceiling < fastest:
        softmax = latency.latency(LayerPlan.uniform("softmax", cost.num_layers))
        raise UserError(f"objective.latency_ceiling: {ceiling} s cannot be met; the fastest plan in the space is "
                        f"predicted at {fastest:.3f} s (all-softmax {softmax:.3f} s) for this workload")


def _servable(study, candidates: list, settings: SearchSettings) -> list:
    """The candidates worth serving: all of them when confirmation is off, else those that keep the floors at
    the pick rung (the others are never offered: serving them would only spend minutes)."""
    from .report import Ladder, gather_evidence

    if not settings.fidelity.rungs or not candidates:
        return candidates
    objectives = declare_objectives(settings.objective, settings.speed)
    ladder = Ladder(study, objectives, settings.fidelity.rungs)
    floors = floors_of(settings.fidelity, settings.objective, _original(study))
    evidence = {e.number: e for e in gather_evidence(study, ladder, settings.fidelity.pick_rung, candidates, None)}
    return [t for t in candidates if t.number in evidence and evidence[t.number].shortfall(
        replace(floors, ceilings={})) is None]  # ceilings are judged on the measured serving itself


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


def make_surrogate_feed(settings: SearchSettings, space, cost, sensitivity_rows, objectives, critical=frozenset()):
    """The search's surrogate feed (None when `surrogate.enabled=false`); it proposes no plan holding a
    `critical` (layer, option) choice (one that alone loses the retrieval floor, seeds.retrieval_critical)."""
    from .surrogate_feed import SurrogateFeed

    return SurrogateFeed.maybe(settings.surrogate, space, cost, sensitivity_rows, objectives, settings.objective,
                               critical)


def _candidates(study, k: int, settings: SearchSettings, reference: dict, cost) -> list:
    """The `k` trials a best-plan file could name (fidelity.ladder_candidates), drawn from the plans that keep
    the floors and ceilings on their proxy point estimates (fidelity.screened_pool) and whose proxy agreement
    keeps the quality floor: the others would most likely never be offered. Where fewer than `k` pass, the rest
    come from the search's front as before, so confirmation still says why they fall short."""
    speed = SPEEDS[settings.speed]
    floor, _ = retrieval_floor(settings.objective, _original(study))
    sign = 1 if study.directions[0] == StudyDirection.MINIMIZE else -1
    pool = screened_pool(_feasible(study), k, keeps_floors_at_proxy(settings.objective, cost, floor), sign,
                         lambda t: speed.cost(t.values[1]))

    def ladder(front: list, slots: int) -> list:
        return ladder_candidates(front, slots, KEEP_BARS, [speed.share(t) for t in speed.targets],
                                 speed.cost(reference[speed.column]), lambda t: speed.cost(t.values[1]),
                                 settings.fidelity.agreement_floor)

    chosen = ladder(pool, k)
    if len(chosen) < k:
        taken = {t.number for t in chosen}
        chosen += ladder([t for t in front_trials(study) if t.number not in taken], k - len(chosen))
    return chosen


def _feasible(study) -> list:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get(FEASIBLE_ATTR, True)]


def _faster_candidates(study, candidates: list, settings: SearchSettings, reference: dict, cost) -> list:
    """`fidelity.faster_k` more candidates once `candidates` are confirmed (fidelity.faster_than_keepers): plans
    keeping the floors and the quality floor at the proxy (the ceilings within their slack), faster than the
    fastest candidate that kept every floor at the pick rung (than all-softmax when none did)."""
    from .fidelity import faster_than_keepers, proxy_metrics, retained

    speed = SPEEDS[settings.speed]
    keepers = _servable(study, candidates, settings)
    bar = min((speed.cost(t.values[1]) for t in keepers), default=speed.cost(reference[speed.column]))
    floor, _ = retrieval_floor(settings.objective, _original(study))
    keeps = keeps_floors_at_proxy(settings.objective, cost, floor)
    taken = {t.number for t in candidates}
    pool = [t for t in _feasible(study) if t.number not in taken and not is_original(t.user_attrs[PLAN_ATTR])
            and keeps(t) and (retained(proxy_metrics(t)) or 0.0) >= settings.fidelity.agreement_floor]
    return faster_than_keepers(pool, settings.fidelity.faster_k, bar, lambda t: speed.cost(t.values[1]))


def _climb_fidelity_ladder(settings: SearchSettings, study, runner, reference: dict, cost, progress: bool,
                           stage: Stages) -> list:
    """The candidates, re-measured at every rung (resumable: what the study already holds is skipped)."""
    f = settings.fidelity
    if f.top_k <= 0:
        return []
    # the original needs no confirming: every rung measures it on the same text as each candidate's reference
    candidates = [t for t in _candidates(study, f.top_k + 1, settings, reference, cost)
                  if not is_original(t.user_attrs[PLAN_ATTR])][:f.top_k]
    if f.rungs:
        measured = climb(study, runner, candidates, f.rungs, lambda t: t.user_attrs[PLAN_ATTR], progress)
        if f.faster_k:  # past the fastest keeper (deterministic given the study: a resumed run picks the same)
            faster = _faster_candidates(study, candidates, settings, reference, cost)
            measured += climb(study, runner, faster, f.rungs, lambda t: t.user_attrs[PLAN_ATTR], progress)
            candidates = candidates + faster
        prefill = settings.workload.prefill
        for rung in f.rungs:
            stage.count("confirmation", [m for m in measured if m == rung.name], rung.blocks, rung.seq_len(prefill))
    return candidates


def _score_front_with_lm_eval(settings: SearchSettings, study, runner, reference: dict, cost,
                              progress: bool) -> None:
    """lm-eval tasks for the first `eval.top_k` candidates (the ladder's order) not scored yet (resumable)."""
    e = settings.eval
    top_k, tasks = e.top_k, list(e.tasks)
    if top_k <= 0 or not tasks:
        return
    front = _candidates(study, top_k, settings, reference, cost)
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
    speed = speed_of_study(study).key  # the study's own metric, whatever workload this report asks about
    objectives = declare_objectives(settings.objective, speed)
    options = settings.workbench.options
    cost = serving_cost_model(bench.switcher, bench.info, options, Workload(**searched), priced_options(space),
                              speed=speed)
    run_dir = Path(settings.output_dir) / "runs" / name
    made_with = study.user_attrs.get(MADE_WITH_ATTR) or (settings.workbench.record() if asked == searched else None)
    context = {"model": bench.info, "settings": options, "bank_id": bank_id_or_none(bench),
               "workload": searched, "made_with": made_with, "study": name, "storage": url,
               "layer_kinds": layer_kinds(bench.model), "not_searched": prepared.notes,
               "reference": reference_serving(cost, bench.switcher.num_layers)}
    print(write_report(study, objectives, run_dir, context, settings.fidelity.rungs, settings.fidelity.pick_rung,
                       floors_of(settings.fidelity, settings.objective, _original(study))))
    print(f"report: {run_dir}")
    if asked != searched:
        from .resolve import longer_prompt_warning

        if warning := longer_prompt_warning(searched["prefill"], asked["prefill"]):
            print(warning)
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
    cost = serving_cost_model(bench.switcher, bench.info, options, settings.workload, priced_options(space),
                              speed=speed_of(objectives).key)
    proxy = bench.proxy_evaluator()  # only used if the sensitivity cache is gone
    rows = cached_sensitivity(bench.switcher, proxy, bench.scoring_key(),
                              progress=settings.workbench.progress, options=sensitivity_options(space))
    out_dir = run_dir / "workloads" / workload_tag(workload)
    o = settings.objective
    table = resolve_front(study, objectives, space, cost, rows, workload, out_dir, o.latency_ceiling,
                          o.memory_ceiling)
    print(f"\nfront re-solved for workload {workload} ({time.perf_counter() - started:.1f} s, "
          f"nothing re-evaluated):\n{table}\nwritten to {out_dir}")
