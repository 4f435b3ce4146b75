"""Runners: a pool of evaluators behind `submit(key, method, plan)` / `next_result()`.

`SerialRunner` evaluates in-process; `RayRunner` keeps one Ray actor per worker, each loading the model once
and the driver's bank from Ray's object store (so a node without the driver's cache never retrains it). A
worker that dies is replaced and its job retried (up to `max_retries`).
"""
from __future__ import annotations

import logging
import os
from collections import deque
from typing import Protocol

from layerboost_core.errors import UserError

from .settings import EvaluatorSettings, RunnerSettings

log = logging.getLogger(__name__)


class Runner(Protocol):
    capacity: int

    def submit(self, key, method: str, plan_text: str) -> None: ...

    def next_result(self) -> tuple[object, dict]: ...

    def close(self) -> None: ...


class SerialRunner:
    """In-process evaluation, one job at a time (debugging, tests)."""

    def __init__(self, evaluator_settings: EvaluatorSettings):
        from .worker import PlanEvaluator

        self.capacity = 1
        self.evaluator = PlanEvaluator(evaluator_settings)
        self.queue: deque = deque()

    def submit(self, key, method: str, plan_text: str) -> None:
        self.queue.append((key, method, plan_text))

    def next_result(self):
        key, method, plan_text = self.queue.popleft()
        try:
            return key, getattr(self.evaluator, method)(plan_text)
        except Exception as error:  # an evaluation bug is a failed trial, not a crashed search
            return key, {"error": f"{type(error).__name__}: {error}"}

    def pending(self) -> int:
        return len(self.queue)

    def close(self) -> None:
        pass


class RayRunner:
    """A pool of Ray actors; each holds a `PlanEvaluator`."""

    def __init__(self, evaluator_settings: EvaluatorSettings, runner_cfg: RunnerSettings, evaluator_class=None,
                 bank=None):
        """`evaluator_class`: the actor class (default `PlanEvaluator`; tests pass instrumented subclasses);
        `bank`: the driver's `Bank`, put once in the object store for every actor (and every replacement)."""
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self.ray = ray
        self.started_ray = not ray.is_initialized()  # our own local instance, shut down by `close`
        if not ray.is_initialized():
            try:
                if runner_cfg.address:
                    ray.init(address=runner_cfg.address, include_dashboard=False, log_to_driver=False)
                else:
                    # Ray renices its workers to 15 so its own daemons stay responsive; here the workers *are*
                    # the job, and at nice 15 any other busy process on the machine starves them (the actors
                    # took minutes to start next to one CPU-bound benchmark). Start them at normal priority.
                    os.environ.setdefault("RAY_worker_niceness", "0")
                    workers = runner_cfg.num_workers
                    cpus = max(runner_cfg.num_cpus, 1) * workers
                    gpus = runner_cfg.num_gpus * workers
                    # "local": always our own instance, never a cluster found through RAY_ADDRESS or `ray start`
                    # (which would refuse num_cpus); joining one is `runner.address=auto`.
                    ray.init(address="local", num_cpus=cpus, num_gpus=gpus if gpus else None,
                             include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise UserError(f"runner.address: cannot start or join Ray ({error})") from None
        self.evaluator_settings = evaluator_settings
        self.runner_cfg = runner_cfg
        self.bank_ref = None if bank is None else ray.put(bank)
        self.capacity = runner_cfg.num_workers
        self.max_retries = runner_cfg.max_retries
        if evaluator_class is None:
            from .worker import PlanEvaluator as evaluator_class

        # SPREAD: one actor per node while nodes last (each holds a model: spreading spreads the memory, and a
        # lost node takes fewer workers with it); a soft strategy, so a replacement still lands on any node left.
        self.actor_class = ray.remote(evaluator_class).options(
            num_cpus=runner_cfg.num_cpus or 1, num_gpus=runner_cfg.num_gpus, max_restarts=0,
            scheduling_strategy="SPREAD")
        self.actors = [self._new_actor() for _ in range(self.capacity)]
        self.idle = list(range(self.capacity))
        self.queue: deque = deque()
        self.running: dict = {}  # object ref -> (actor index, key, method, plan_text, attempt)

    def _new_actor(self):
        threads = max(self.runner_cfg.num_cpus, 1)
        return self.actor_class.remote(self.evaluator_settings, threads, self.bank_ref)

    def submit(self, key, method: str, plan_text: str, attempt: int = 0) -> None:
        self.queue.append((key, method, plan_text, attempt))
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            index = self.idle.pop()
            key, method, plan_text, attempt = self.queue.popleft()
            ref = getattr(self.actors[index], method).remote(plan_text)
            self.running[ref] = (index, key, method, plan_text, attempt)

    def pending(self) -> int:
        return len(self.queue) + len(self.running)

    def next_result(self):
        ray = self.ray
        while True:
            ready, _ = ray.wait(list(self.running), num_returns=1)
            ref = ready[0]
            index, key, method, plan_text, attempt = self.running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                log.warning("worker %d died during %s of %s (%s); replacing it", index, method, plan_text,
                            type(error).__name__)
                # An unreachable actor may still be alive (ActorUnavailableError): kill it, or it keeps its CPU
                # and the replacement waits for resources that never free.
                self.ray.kill(self.actors[index])
                self.actors[index] = self._new_actor()
                if attempt < self.max_retries:
                    self.idle.append(index)
                    self.submit(key, method, plan_text, attempt + 1)
                    continue
                result = {"error": f"worker died {attempt + 1} times"}
            except ray.exceptions.OutOfMemoryError as error:
                # Ray killed the actor to save the node: the same job would be killed again, so no retry
                log.warning("worker %d was killed for memory during %s of %s; replacing it", index, method, plan_text)
                self.ray.kill(self.actors[index])
                self.actors[index] = self._new_actor()
                result = {"error": f"killed for memory: {str(error).strip().splitlines()[0]}"}
            except ray.exceptions.RayTaskError as error:
                result = {"error": str(error).strip().splitlines()[-1]}
            self.idle.append(index)
            self._dispatch()
            return key, result

    def actor_pids(self) -> list[int]:
        return self.ray.get([actor.pid.remote() for actor in self.actors])

    def close(self) -> None:
        """Kill the actors; a local Ray instance this runner started is shut down too, so that nothing of it
        shares the CPU with what the driver times next (the measured serving of the picks)."""
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started_ray and not self.runner_cfg.address:
            self.ray.shutdown()


def make_runner(evaluator_settings: EvaluatorSettings, runner_cfg: RunnerSettings, bank=None) -> Runner:
    """The configured pool; `bank` (the driver's, or None) reaches Ray actors through the object store."""
    if runner_cfg.kind == "serial":
        return SerialRunner(evaluator_settings)
    return RayRunner(evaluator_settings, runner_cfg, bank=bank)
