"""`layerboost search` (= `python search.py`) and `layerboost report`."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import OmegaConf
from optuna.trial import TrialState

from layerboost_core.cli import verb
from layerboost_core.errors import UserError
from layerboost_core.plan import LayerPlan
from layerboost_core.sensitivity import cached_sensitivity_rows, write_sensitivity_csv
from layerboost_core.workbench import attach_bank, open_workbench, option_settings

from .driver import (PLAN_ATTR, SearchRun, enqueue_seeds, lm_eval_scores, make_sampler, open_study, record_lm_eval,
                     requeue_abandoned, storage_url, study_name)
from .objectives import declare_objectives
from .report import front_trials, write_report
from .runner import make_runner
from .seeds import seed_plans
from .space import SearchSpace

log = logging.getLogger(__name__)

LATENCY_TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
OFFLINE_TASKS = ("lb_cloze", "lb_passkey", "lb_mqar")
WORKLOAD_ATTR = "workload"  # study user attr: the workload the study's latencies were predicted for


def _validate(cfg) -> None:
    if int(cfg.budget) <= 0:
        raise UserError(f"budget: {cfg.budget} must be a positive number of evaluations")
    if int(cfg.runner.num_workers) < 1:
        raise UserError(f"runner.num_workers: {cfg.runner.num_workers} must be >= 1")
    _validate_surrogate(cfg.get("surrogate"))


def _validate_surrogate(settings) -> None:
    """Checked before anything is written: the feed first reads these settings after the sensitivity table."""
    if settings is None or not bool(settings.enabled):
        return
    for field, least in (("start_after", 0), ("every", 1), ("count", 1)):
        value = settings.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"surrogate.{field}: {value!r} must be an integer >= {least}")
    max_loss = settings.get("max_loss")
    if max_loss is not None and (isinstance(max_loss, bool) or not isinstance(max_loss, (int, float)) or not max_loss > 0):
        raise UserError(f"surrogate.max_loss: {max_loss!r} must be a positive number (nats/token of the proxy) or null")


def _scores_by_runner(runner, jobs: dict, progress: bool) -> dict:
    """Evaluate {key: plan} on the runner pool; returns {key: result}."""
    from tqdm.auto import tqdm

    results = {}
    for key, plan in jobs.items():
        runner.submit(key, "evaluate", str(plan))
    for _ in tqdm(range(len(jobs)), desc="sensitivity", unit="swap", disable=not progress):
        key, result = runner.next_result()
        results[key] = result
    return results


def run_search(cfg) -> Path:
    _validate(cfg)
    sampler = make_sampler(cfg)
    objectives = declare_objectives(cfg.objective, OFFLINE_TASKS)
    from layerboost_surrogates.cost_model import Workload, cost_model

    workload = Workload(**OmegaConf.to_container(cfg.workload))
    # The bank (minutes when cold) comes after every check that can refuse the run: the space needs only the
    # layer count, and the cost model only the modules' shapes (timing does not depend on trained weights).
    bench = open_workbench(cfg, with_bank=False)
    info, n = bench.info, bench.switcher.num_layers
    space = SearchSpace.from_config(cfg.space, n)
    cost = cost_model(bench.switcher, info, option_settings(cfg), workload)
    softmax_latency = cost.latency(LayerPlan.uniform("softmax", n))
    ceiling = cfg.objective.latency_ceiling
    fastest = cost.fastest(space.options)
    if ceiling is not None and float(ceiling) < fastest:
        raise UserError(f"objective.latency_ceiling: {ceiling} s cannot be met; the fastest plan in the space is "
                        f"predicted at {fastest:.3f} s (all-softmax {softmax_latency:.3f} s) for this workload")
    attach_bank(bench)

    name = study_name(cfg, info, bench.bank.id)
    study = open_study(cfg, name, objectives, sampler)
    if WORKLOAD_ATTR not in study.user_attrs:  # what `layerboost report` compares a new workload against
        study.set_user_attr(WORKLOAD_ATTR, OmegaConf.to_container(cfg.workload))
    run_dir = Path(cfg.output_dir) / "runs" / name
    requeued = requeue_abandoned(study)
    if requeued:
        log.info("re-queued %d trial(s) left running by an interrupted run", requeued)

    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    runner = make_runner(cfg_dict, cfg.runner)
    try:
        started = time.perf_counter()
        rows = cached_sensitivity_rows(
            (bench.bank.id, bench.splits.hashes["heldout"]), n,
            lambda jobs: _scores_by_runner(runner, jobs, bool(cfg.progress)))
        write_sensitivity_csv(rows, run_dir / "sensitivity.csv")
        log.info("sensitivity table ready (%.0f s)", time.perf_counter() - started)
        seeded = enqueue_seeds(study, space, seed_plans(rows, n, space=space, cost=cost))
        if seeded:
            log.info("enqueued %d seed plans", seeded)
        context_for_plan = {"model_config": bench.model.config, "option_settings": option_settings(cfg),
                            "bytes_per_value": bench.model.dtype.itemsize}
        surrogate = make_surrogate_feed(cfg, space, cost, rows, objectives, context_for_plan)
        search = SearchRun(cfg, space, objectives, study, cost, runner, context_for_plan, surrogate)
        search.run(int(cfg.budget), progress=bool(cfg.progress))
        _score_front_with_lm_eval(cfg, study, runner)
    finally:
        runner.close()

    context = {"model": info, "settings": option_settings(cfg), "bank_id": bench.bank.id,
               "workload": OmegaConf.to_container(cfg.workload), "study": name, "storage": storage_url(cfg, name),
               "softmax_latency": softmax_latency}
    table = write_report(study, objectives, run_dir, context, LATENCY_TARGETS)
    print(f"\nPareto front of {name} ({len(front_trials(study))} plans; all-softmax latency {softmax_latency:.3f} s):")
    print(table)
    print(f"\nreport: {run_dir}   dashboard: optuna-dashboard {storage_url(cfg, name)}")
    return run_dir


def make_surrogate_feed(cfg, space, cost, sensitivity_rows, objectives, context_for_plan):
    """The search's surrogate feed (None when `surrogate.enabled=false`)."""
    from layerboost_surrogates.solver import kv_per_layer

    from .surrogate_feed import SurrogateFeed

    context = int(cfg.workload.prefill) + int(cfg.workload.decode)
    kv = kv_per_layer(set(space.options) | set(space.pinned.values()), context_for_plan["model_config"],
                      context_for_plan["option_settings"], context, context_for_plan["bytes_per_value"])
    return SurrogateFeed.maybe(cfg.get("surrogate"), space, cost, sensitivity_rows, objectives, cfg.objective, kv)


def _score_front_with_lm_eval(cfg, study, runner) -> None:
    """Second fidelity: lm-eval tasks for the top-k front candidates not scored yet (resumable)."""
    top_k, tasks = int(cfg.eval.top_k), list(cfg.eval.tasks)
    if top_k <= 0 or not tasks:
        return
    front = front_trials(study)
    if len(front) > top_k:  # spread over the front: its ends and evenly between
        step = (len(front) - 1) / (top_k - 1) if top_k > 1 else 0
        front = [front[round(i * step)] for i in range(top_k)]
    scored = lm_eval_scores(study)
    todo = [t for t in front if t.number not in scored]
    if not todo:
        return
    from tqdm.auto import tqdm

    log.info("lm-eval: scoring %d front candidate(s) on %s (%s examples each)", len(todo), ", ".join(tasks),
             cfg.eval.limit or cfg.eval.n_examples)
    for trial in todo:
        runner.submit(trial.number, "lm_eval", trial.user_attrs[PLAN_ATTR])
    for _ in tqdm(todo, desc="lm-eval", unit="plan", disable=not bool(cfg.progress)):
        number, result = runner.next_result()
        if "error" in result:
            log.warning("lm-eval of trial %d failed: %s", number, result["error"])
            continue
        record_lm_eval(study, number, result["scores"])


@verb("search")
def search_command(cfg) -> None:
    """Multi-objective search of per-layer attention options; resumable."""
    run_search(cfg)


@verb("report")
def report_command(cfg) -> None:
    """Re-write the report files of an existing study (same overrides as the search). With `study=<name>` and
    a `workload` other than the study's, also re-solve its front for that workload (nothing re-evaluated)."""
    import optuna

    objectives = declare_objectives(cfg.objective, OFFLINE_TASKS)
    bench = open_workbench(cfg, with_bank=True)
    from layerboost_surrogates.cost_model import Workload, cost_model

    name = study_name(cfg, bench.info, bench.bank.id)
    try:
        study = optuna.load_study(study_name=name, storage=storage_url(cfg, name))
    except KeyError:
        raise UserError(f"study: no study {name!r} in {storage_url(cfg, name)}; run the search first"
                        + _other_studies_hint(cfg, name)) from None
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UserError(f"study: {name!r} has no completed trials yet")
    asked = OmegaConf.to_container(cfg.workload)
    searched = study.user_attrs.get(WORKLOAD_ATTR, asked)
    settings = option_settings(cfg)
    cost = cost_model(bench.switcher, bench.info, settings, Workload(**searched))
    run_dir = Path(cfg.output_dir) / "runs" / name
    context = {"model": bench.info, "settings": settings, "bank_id": bench.bank.id,
               "workload": searched, "study": name, "storage": storage_url(cfg, name),
               "softmax_latency": cost.latency(LayerPlan.uniform("softmax", bench.switcher.num_layers))}
    print(write_report(study, objectives, run_dir, context, LATENCY_TARGETS))
    print(f"report: {run_dir}")
    if asked != searched:
        _resolve_for_workload(cfg, bench, study, objectives, asked, run_dir)


def _other_studies_hint(cfg, name: str) -> str:
    """A hint naming the studies that do exist (a changed workload changes the derived study name)."""
    if cfg.storage:
        return ""
    others = sorted(p.stem for p in (Path(cfg.output_dir) / "studies").glob("*.db") if p.stem != name)
    return f" (studies in {cfg.output_dir}/studies: {', '.join(others)}; pick one with study=<name>)" if others else ""


def _resolve_for_workload(cfg, bench, study, objectives, workload: dict, run_dir: Path) -> None:
    from layerboost_core.metrics import ProxyEvaluator
    from layerboost_core.sensitivity import cached_sensitivity
    from layerboost_surrogates.cost_model import Workload, cost_model

    from .resolve import resolve_front, workload_tag

    started = time.perf_counter()
    settings = option_settings(cfg)
    cost = cost_model(bench.switcher, bench.info, settings, Workload(**workload))
    proxy = ProxyEvaluator(bench.model, bench.splits.heldout)  # only used if the sensitivity cache is gone
    rows = cached_sensitivity(bench.switcher, proxy, (bench.bank.id, bench.splits.hashes["heldout"]),
                              progress=bool(cfg.progress))
    space = SearchSpace.from_config(cfg.space, bench.switcher.num_layers)
    out_dir = run_dir / "workloads" / workload_tag(workload)
    table = resolve_front(study, objectives, space, cost, rows, bench.model.config, settings,
                          bench.model.dtype.itemsize, workload, out_dir, cfg.objective.latency_ceiling,
                          cfg.objective.memory_ceiling)
    print(f"\nfront re-solved for workload {workload} ({time.perf_counter() - started:.1f} s, "
          f"nothing re-evaluated):\n{table}\nwritten to {out_dir}")
