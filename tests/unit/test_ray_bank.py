"""Ray actors get the driver's bank through Ray's object store, never from their node's disk cache: actors
whose cache (LAYERBOOST_CACHE) holds no bank evaluate a `linear` plan with the driver's bank, train nothing
and write no bank."""
from __future__ import annotations

import pytest

from layerboost_core.cache_dir import cache_root

TINY = ["model=tiny:llama", "eval=none", "transfer.batches=2", "data.seq_len=128", "proxy.facts=1", "progress=false",
        "space.prune_dominated=false",
        "runner=ray", "runner.num_workers=1"]


@pytest.mark.timeout(300)
def test_actors_load_the_drivers_bank_without_training(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from layerboost.config import compose
    from layerboost.settings import search_settings
    from layerboost_core.workbench import open_workbench
    from layerboost_search.runner import RayRunner
    from layerboost_search.worker import PlanEvaluator

    class BankReporter(PlanEvaluator):
        """Says where its cache is and which bank it holds (a local class: Ray pickles it by value)."""

        def where(self) -> tuple[str, str]:
            return str(cache_root()), self.bench.bank.id

    settings = search_settings(compose([*TINY, f"output_dir={tmp_path}"]))
    driver = open_workbench(settings.workbench, with_bank=True)  # from the shared cache, or trained now
    in_process = PlanEvaluator(settings.evaluator(with_bank=True), bank=driver.bank).evaluate("LLLL")

    # The actors' cache has the converted tokenizer the tiny model borrows, and no bank.
    node_cache = tmp_path / "node-cache"
    node_cache.mkdir()
    (node_cache / "models").symlink_to(cache_root() / "models")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"LAYERBOOST_CACHE": str(node_cache)}})
    try:
        runner = RayRunner(settings.evaluator(with_bank=True), settings.runner, evaluator_class=BankReporter,
                           bank=driver.bank)
        assert ray.get(runner.actors[0].where.remote()) == (str(node_cache), driver.bank.id)
        runner.submit(0, "evaluate", "LLLL")
        _, result = runner.next_result()
        runner.close()
    finally:
        ray.shutdown()
    assert result["metrics"] == pytest.approx(in_process["metrics"], rel=1e-5)
    assert not (node_cache / "banks").exists(), "an actor trained or cached a bank of its own"
