"""The search engine: from typed settings, an Optuna study whose plans a pool of evaluators (in-process or Ray
actors) scores, seeded and fed by the surrogates, then the fidelity ladder and the report."""
from .objectives import Objective, declare_objectives
from .pipeline import report_study, run_search
from .settings import (EvalSettings, FidelitySettings, ObjectiveSettings, RungSettings, RunnerSettings, SearchSettings,
                       SurrogateSettings)

__all__ = ["EvalSettings", "FidelitySettings", "Objective", "ObjectiveSettings", "RungSettings", "RunnerSettings",
           "SearchSettings", "SurrogateSettings", "declare_objectives", "report_study", "run_search"]
