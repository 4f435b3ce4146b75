"""`layerboost report`."""
from __future__ import annotations

from . import shows


@shows("study", "storage", "workload.prefill", "workload.decode", "workload.batch", "output_dir")
def report(cfg) -> None:
    """Re-write the report files of an existing study (same overrides as the search). With `study=<name>` and a
    workload other than the study's, also re-solve its front for that workload (nothing re-evaluated)."""
    from ..settings import search_settings

    from layerboost_search.pipeline import report_study

    report_study(search_settings(cfg))
