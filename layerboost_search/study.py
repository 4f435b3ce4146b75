"""The study's storage, and what lets many drivers share it: a stable name and URL, the schema race of drivers
started together, the lock that hands one waiting trial to one driver, heartbeats for the trials a driver
evaluates, and the re-queueing of trials whose driver stopped. Also the names of the user attrs a trial and the
study record (plan, label, feasibility, lm-eval scores), which the driver, the report and re-solve read.
"""
from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import optuna

from layerboost_core.cache_dir import content_hash
from layerboost_core.errors import UserError
from layerboost_core.metrics import METRICS_VERSION

from .settings import SearchSettings

log = logging.getLogger(__name__)

PLAN_ATTR, LABEL_ATTR, FEASIBLE_ATTR = "plan", "label", "feasible"
REQUEUED_ATTR = "requeued_from"  # trial user attr: the number of the stale trial whose plan this one re-runs
# lm-eval scores arrive after a trial has finished, and Optuna refuses to change a finished trial, so they
# live in the study's user attrs under this prefix + the trial number ({task: accuracy}); the dashboard
# shows them there and the report merges them into the trial's own `lm_eval:<task>` columns.
LM_EVAL_STUDY_ATTR = "lm_eval:trial:"


def record_lm_eval(study: optuna.Study, number: int, scores: dict) -> None:
    study.set_user_attr(f"{LM_EVAL_STUDY_ATTR}{number}", {task: float(v) for task, v in scores.items()})


def lm_eval_scores(study: optuna.Study) -> dict[int, dict]:
    """{trial number: {task: accuracy}} for every trial scored with lm-eval."""
    return {int(key.removeprefix(LM_EVAL_STUDY_ATTR)): value for key, value in study.user_attrs.items()
            if key.startswith(LM_EVAL_STUDY_ATTR)}


def _safe(name: str) -> str:
    """A study / file name: letters, digits, '.', '_' and '-' only."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def study_name(settings: SearchSettings, info: dict, bank_id: str) -> str:
    """`settings.study`, or a name derived from everything that makes two studies' numbers comparable."""
    if settings.study:
        return _safe(str(settings.study))
    key = content_hash(METRICS_VERSION, info["fingerprint"], bank_id, settings.space, asdict(settings.objective),
                       asdict(settings.workload), asdict(settings.workbench.data), asdict(settings.workbench.proxy),
                       settings.workbench.options, settings.sampler["_target_"])
    return _safe(f"{info['name']}-{key[:10]}")


def storage_url(settings: SearchSettings, name: str) -> str:
    if settings.storage:
        return str(settings.storage)
    path = Path(settings.output_dir) / "studies" / f"{name}.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def _rdb_storage(url: str, heartbeat_interval: int, grace_period: int, attempts: int = 5):
    """Optuna's RDBStorage at `url`. Drivers started together on a new database race to create its schema (the
    loser gets "table ... already exists", or a duplicate alembic_version row); it retries and finds the schema
    in place. Other errors (a bad URL or path) are raised at once."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval,
                                                  grace_period=grace_period,
                                                  heartbeat_stale_trial_callback=StaleRequeue())
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as error:
            lost_race = "already exists" in str(error) or "alembic_version" in str(error)
            if not lost_race or attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random() * 0.3 * (attempt + 1))


def open_study(url: str, name: str, objectives, sampler, heartbeat_interval: int, grace_period: int) -> optuna.Study:
    """The study at `url`, its storage recording trial heartbeats (see `Heartbeat`, `fail_stale`)."""
    try:
        storage = _rdb_storage(url, heartbeat_interval, grace_period)
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
                                    directions=[o.direction for o in objectives])
    except ValueError as error:
        raise UserError(f"storage: study {name!r} exists with other objectives ({error})") from None
    except Exception as error:  # sqlalchemy / RDB errors for unusable URLs or paths
        raise UserError(f"storage: cannot open {url!r} ({type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0]})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in objectives])
    return study


def waiting_trial_lock(url: str | None):
    """A lock every driver of a sqlite study holds while it asks for a trial, so that one enqueued (waiting)
    trial goes to one driver. Optuna pops a waiting trial by reading its state and then setting it to RUNNING;
    on server databases the row is locked for update between the two, but sqlite's Python driver does not open
    the transaction until the write, so two drivers asking at the same moment both read WAITING and both
    evaluate the trial. The lock is a file next to the database (drivers on one machine; a sqlite file on a
    network share is not safe for several writers anyway: use a server database there). Other storages: none
    needed."""
    import sqlalchemy.engine

    if url is None:
        return contextlib.nullcontext()
    parsed = sqlalchemy.engine.make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(f"{parsed.database}.ask.lock")


def storage_url_of(study: optuna.Study) -> str | None:
    """The database URL of a study on an RDB storage (Optuna wraps it in a caching layer), else None."""
    backend = getattr(study._storage, "_backend", study._storage)
    return getattr(backend, "url", None)


class StaleRequeue:
    """The storage's heartbeat-stale callback: the plan of a trial whose driver stopped goes back in the queue
    with its label (`requeued_from` points to the failed trial; `pop_requeued` hands it out before anything
    else waiting); the numbers are kept for the log."""

    def __init__(self):
        self.requeued: list[int] = []

    def __call__(self, study: optuna.Study, trial) -> None:
        study.enqueue_trial(trial.params, user_attrs={LABEL_ATTR: trial.user_attrs.get(LABEL_ATTR, "sampled"),
                                                       REQUEUED_ATTR: trial.number})
        self.requeued.append(trial.number)


def pop_requeued(study: optuna.Study, fixed_distributions: dict) -> "optuna.Trial | None":
    """The oldest waiting trial that re-runs a stopped driver's plan, claimed for this driver (RUNNING), with
    `fixed_distributions` suggested as `Study.ask` does; None when there is none. `Study.ask` pops waiting
    trials oldest first, and a re-queued plan is enqueued behind every seed and proposal still waiting: a run
    whose budget fills first would leave it waiting for ever. Its slot was taken before its driver stopped, so
    it goes first. Claimed as Optuna claims a waiting trial (the storage's WAITING -> RUNNING update succeeds
    for one driver only); call it under `waiting_trial_lock`."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if REQUEUED_ATTR not in trial.user_attrs:
            continue
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        claimed = optuna.Trial(study, trial._trial_id)
        for name, distribution in fixed_distributions.items():
            claimed._suggest(name, distribution)
        return claimed
    return None


def fail_stale(study: optuna.Study) -> list[int]:
    """Fail the running trials whose driver stopped beating for the grace period and re-queue their plans;
    their numbers. Trials of live drivers (any number of them) are left alone."""
    callback = study._storage.get_heartbeat_stale_trial_callback()
    before = len(callback.requeued)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    numbers = callback.requeued[before:]
    if numbers:
        log.info("re-queued %d trial(s) left running by a stopped driver: %s", len(numbers), numbers)
    return numbers


class Heartbeat:
    """Records a heartbeat for each trial this driver is evaluating, every interval, from a background thread:
    the driver's main thread waits on evaluations for minutes, and a silent trial would look abandoned."""

    def __init__(self, study: optuna.Study):
        self.storage = study._storage  # Optuna's own fail_stale_trials reaches the storage the same way
        # None: a study without heartbeats (in memory: one process, nothing can go stale; or a database opened
        # without a heartbeat interval): nothing is recorded and no trial is ever failed as stale.
        interval = getattr(self.storage, "get_heartbeat_interval", None)
        self.interval = interval() if interval is not None else None
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)
        if self.interval is not None:
            self.thread.start()

    def add(self, trial_id: int) -> None:
        """Start beating for a trial (the first beat at once: a trial without any is never considered stale)."""
        if self.interval is None:
            return
        self.storage.record_heartbeat(trial_id)
        with self.lock:
            self.trial_ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as error:  # a busy database: the next beat retries, well within the grace period
                    log.warning("heartbeat of trial id %d not recorded (%s)", trial_id, type(error).__name__)

    def close(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
