"""An evaluator: holds the model, the bank and the cached original log-probs; switches plans in place.

The same class runs in-process (serial runner) or as a Ray actor (ray runner). It takes typed settings
(plain frozen dataclasses) so they pickle to remote workers.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch

from .settings import EvaluatorSettings


class PlanEvaluator:
    def __init__(self, settings: EvaluatorSettings, threads: int | None = None, bank=None):
        """`bank`: the driver's `Bank` (Ray actors get it through the object store); None: read it from this
        node's cache, where the driver built it (the serial runner, in the driver's own process)."""
        if threads:
            torch.set_num_threads(threads)
        from layerboost_core.logs import quiet_libraries
        from layerboost_core.workbench import open_workbench

        quiet_libraries()
        self.settings = settings
        self.bench = open_workbench(settings.workbench, with_bank=settings.with_bank and bank is None)
        if settings.with_bank and bank is not None:  # never the node's disk cache: a fresh node would retrain
            self.bench.switcher.load_bank(bank)
            self.bench.bank = bank
        self.proxy = self.bench.proxy_evaluator()
        self._task_dir = None
        self._rungs = {}  # rung name -> its ProxyEvaluator, built on first use (most workers never climb)

    def pid(self) -> int:
        return os.getpid()

    def original(self, _: str = "") -> dict:
        """The original model's own retrieval on the proxy's facts ({} when none are planted), as the proxy
        measured it while caching the reference: no forward."""
        return {"metrics": dict(self.proxy.original), "facts": self.proxy.blocks.num_facts}

    def evaluate(self, plan_text: str) -> dict:
        """Proxy metrics of one plan. Non-finite metrics come back as an error, not as numbers."""
        from layerboost_core.models import dtype_name
        from layerboost_core.plan import LayerPlan

        started = time.perf_counter()
        self.bench.switcher.apply(LayerPlan.from_string(plan_text))
        metrics = self.proxy.evaluate()
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        result = {"metrics": metrics, "seconds": time.perf_counter() - started, "pid": os.getpid(),
                  "dtype": dtype_name(self.bench.loaded.dtype)}  # `auto` resolves per worker
        node = _ray_node_id()
        if node:
            result["node"] = node
        if bad:
            result["error"] = f"non-finite metrics: {', '.join(bad)}"
        return result

    def lm_eval(self, plan_text: str) -> dict:
        """lm-eval task accuracies of one plan (the configured tasks), on the in-memory patched model."""
        from layerboost_core import lm_eval_tasks
        from layerboost_core.plan import LayerPlan

        e = self.settings.eval
        tasks = e.task_settings(self.settings.prefill)
        if self._task_dir is None:
            self._task_dir = lm_eval_tasks.write_offline_tasks(
                None, self.bench.splits.documents["heldout"], self.bench.loaded.tokenizer, tasks)
        started = time.perf_counter()
        self.bench.switcher.apply(LayerPlan.from_string(plan_text))
        # the longest offline request is the passkey context (logits counted as float32: lm-eval log-softmaxes them)
        batch = lm_eval_tasks.batch_for_vocabulary(e.batch_size, self.bench.model.config.vocab_size,
                                                   tasks["passkey_context"])
        scores = lm_eval_tasks.evaluate_tasks(self.bench.model, self.bench.loaded.tokenizer, list(e.tasks),
                                              self._task_dir, batch_size=batch, limit=e.limit)
        return {"scores": scores, "seconds": time.perf_counter() - started}

    def evaluate_at(self, job: str) -> dict:
        """Metrics of one plan at a fidelity rung, with every block's and every fact's value and the original's
        retrieval on the same facts; `job` is "<rung name>|<plan>"."""
        from layerboost_core.plan import LayerPlan

        from .fidelity import split_job

        name, plan_text = split_job(job)
        started = time.perf_counter()
        proxy = self._rung(name)
        self.bench.switcher.apply(LayerPlan.from_string(plan_text))
        result = {**proxy.measure().as_dict(), "original": proxy.original_per_fact}
        bad = [k for k, v in result["metrics"].items() if not math.isfinite(v)]
        if bad:
            result["error"] = f"non-finite metrics: {', '.join(bad)}"
        return {**result, "seconds": time.perf_counter() - started}

    def _rung(self, name: str):
        """The rung's ProxyEvaluator, built once (on the all-softmax model: it caches the original's outputs)."""
        from layerboost_core.metrics import ProxyEvaluator
        from layerboost_core.plan import LayerPlan

        from .fidelity import rung_blocks

        if name not in self._rungs:
            if name not in {r.name for r in self.settings.rungs}:
                raise KeyError(f"no fidelity rung {name!r} in this evaluator's settings")
            w = self.settings.workbench
            blocks = rung_blocks(self.bench.loaded.tokenizer, list(self.settings.rungs), name, w.data,
                                 self.settings.prefill, w.proxy.fact_seed)
            self.bench.switcher.apply(LayerPlan.uniform("softmax", self.bench.switcher.num_layers))
            # one block per forward: a block of 2 x the workload's context has logits of B x 4,096 x vocab floats
            rung = next(r for r in self.settings.rungs if r.name == name)
            self._rungs[name] = ProxyEvaluator(self.bench.model, blocks, batch_size=1,
                                               reference_top_k=w.proxy.reference_top_k, generate=rung.generate)
        return self._rungs[name]


def _ray_node_id() -> str | None:
    """The Ray node this actor runs on (which machine of a cluster evaluated a plan); None outside Ray.
    Looked up without importing Ray: the serial runner must not pay for (or need) it."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
