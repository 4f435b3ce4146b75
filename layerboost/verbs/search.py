"""`layerboost search` (= `python search.py`)."""
from __future__ import annotations

from layerboost_core.errors import UserError

from . import shows


def config_source(model):
    """What `memory_plan` reads the model's config from, without loading weights: the tiny config, or where
    loading would read it (models.resolve_source: a built-in's converted folder, a folder or a hub id)."""
    from layerboost_core import models

    if model.source.startswith(models.TINY_PREFIX):
        model_type, *layers = model.source[len(models.TINY_PREFIX):].split(":")
        return models.tiny_config(model_type, *(int(n) for n in layers))
    return models.resolve_source(model.source, model.fallback_source)


def plan_memory(settings, device_memory_gb: float | None = None):
    """The run's memory and time plan from the model's config and the run's settings (no weights loaded);
    `device_memory_gb`: the device's memory when it is not this machine's (None: read it from the device)."""
    from layerboost_core.memory_plan import memory_plan

    w = settings.workbench
    heldout = w.data.blocks.get("heldout")
    if heldout is None:
        raise UserError("data.blocks.heldout: null (every held-out block) cannot be sized before the data is "
                        "read; set a number of blocks to plan the run")
    workers = settings.runner.num_workers if settings.runner.kind == "ray" else 1  # serial: one in-process
    return memory_plan(config_source(w.model), name=w.model.name, device=w.model.device, dtype=w.model.dtype,
                       heldout_blocks=heldout, seq_len=w.data.heldout_seq_len or w.data.seq_len,
                       batch_size=w.proxy.batch_size, reference_top_k=w.proxy.reference_top_k,
                       linear=w.options.get("linear"), num_workers=workers,
                       device_memory_bytes=None if device_memory_gb is None else int(device_memory_gb * 2**30))


@shows("budget", "study", "storage", "runner.num_workers", "runner.address", "objective.quality",
       "workload.prefill", "surrogate.enabled", "eval.top_k", "output_dir")
def search(cfg) -> None:
    """Multi-objective search of per-layer attention options (quality proxy vs predicted latency at the
    workload); resumable: the same command continues the study at outputs/studies/<study>.db.
    `dry_run=true` prints the run's memory and time plan from the model's config and exits."""
    from layerboost_core.memory_plan import check_fits

    from ..settings import coerce, search_settings

    from layerboost_search.pipeline import run_search

    settings = search_settings(cfg)
    plan = plan_memory(settings, coerce(float | None, cfg.device_memory_gb, "device_memory_gb"))
    if coerce(bool, cfg.dry_run, "dry_run"):
        print(plan.table())
        return
    check_fits(plan)  # an impossible setting is refused here, before minutes of loading weights
    run_search(settings)
