"""LayerBoost core library: plans, the search space, attention options, family adapters, patching, data,
proxy metrics, the bank, the hybrid cache, healing, export and the memory plan. Typed settings only; it never
reads a config file (that is the application's job, package `layerboost`).

The public names below are imported on first use (PEP 562), so `import layerboost_core.errors` (what the CLI
needs for `--help`) does not load torch and transformers.
"""
import importlib

_PUBLIC = {
    "DataSettings": "workbench", "LayerPlan": "plan", "ModelSettings": "workbench", "PROXY_METRICS": "metrics",
    "PlanSwitcher": "patch", "ProxyEvaluator": "metrics", "ProxySettings": "workbench", "SearchSpace": "space",
    "UserError": "errors", "Workbench": "workbench", "WorkbenchSettings": "workbench", "export_hybrid": "export",
    "load_hybrid": "hybrid_folder", "load_plan": "plan", "open_workbench": "workbench",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'layerboost_core' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
