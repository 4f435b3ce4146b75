"""Fractional `runner.num_gpus` on logical GPUs: four actors at 0.5 GPU share a local Ray's two (declared, not
real) GPUs, and each still evaluates on the CPU, since torch sees no CUDA device whatever Ray puts in
CUDA_VISIBLE_DEVICES (device=auto must not pick cuda because of it)."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from tests.integration.test_search_cli import TINY


@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback: needs a machine without CUDA")
def test_half_gpu_actors_get_their_gpu_ids_and_evaluate_on_cpu(tmp_path, monkeypatch):
    import ray

    from layerboost.config import compose
    from layerboost.settings import search_settings
    from layerboost_search.runner import RayRunner
    from layerboost_search.worker import PlanEvaluator

    class GpuProbe(PlanEvaluator):
        """What Ray gave this actor, and where its model lives (a local class: Ray pickles it by value)."""

        def placement(self) -> dict:
            return {"gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                    "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "device": str(self.bench.model.get_input_embeddings().weight.device)}

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cfg = compose([*TINY, f"output_dir={tmp_path}", "runner=ray", "runner.num_workers=4", "runner.num_cpus=1",
                   "runner.num_gpus=0.5", "device=auto"])
    settings = search_settings(cfg)
    runner = RayRunner(settings.evaluator(with_bank=False), settings.runner, evaluator_class=GpuProbe)
    try:
        assert ray.cluster_resources()["GPU"] == 2.0  # 4 actors x 0.5
        placements = ray.get([actor.placement.remote() for actor in runner.actors])
        for placed in placements:
            assert len(placed["gpu_ids"]) == 1, placed  # a fraction of one GPU, never none
            assert placed["visible"] == placed["gpu_ids"][0], placed
            assert placed["device"] == "cpu", placed
        assert Counter(p["gpu_ids"][0] for p in placements) == {"0": 2, "1": 2}  # two actors per GPU
        for number in range(4):  # one plan per actor (softmax and none: no bank needed)
            runner.submit(number, "evaluate", "SNSN")
        results = [runner.next_result()[1] for _ in range(4)]
        assert all("error" not in r and r["metrics"]["kl"] > 0.0 for r in results), results
    finally:
        runner.close()
        ray.shutdown()
