"""`layerboost search` (= `python search.py`)."""
from __future__ import annotations

from layerboost_core.errors import UserError

from . import shows


def make_sampler(cfg):
    """The Optuna sampler of `sampler:` (by `_target_`, e.g. optuna.samplers.TPESampler)."""
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.sampler)
    except Exception as error:  # hydra wraps import and argument errors
        raise UserError(f"sampler._target_: cannot build {cfg.sampler.get('_target_')!r} "
                        f"({str(error).strip().splitlines()[0]})") from None


@shows("budget", "study", "storage", "runner.num_workers", "runner.address", "objective.quality",
       "workload.prefill", "surrogate.enabled", "eval.top_k", "output_dir")
def search(cfg) -> None:
    """Multi-objective search of per-layer attention options (quality proxy vs predicted latency at the
    workload); resumable: the same command continues the study at outputs/studies/<study>.db."""
    from ..settings import search_settings

    from layerboost_search.pipeline import run_search

    settings = search_settings(cfg)
    run_search(settings, make_sampler(cfg))
