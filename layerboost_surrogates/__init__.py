"""Surrogates of the search: the additive cost model (latency and KV bytes of any plan at a workload), the
accuracy predictor, the exact front solver, and plan proposals that fill the gaps of the measured front."""
from .accuracy import make_predictor
from .cost_model import AdditiveCostModel, Workload, cost_model, kv_bytes_per_sequence
from .propose import propose_plans
from .solver import FrontSolver

__all__ = ["AdditiveCostModel", "FrontSolver", "Workload", "cost_model", "kv_bytes_per_sequence", "make_predictor",
           "propose_plans"]
