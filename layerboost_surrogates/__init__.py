"""Surrogates of the search: the serving cost model (TTFT, TPOT, throughput and cache bytes of any plan at a
workload, from pieces measured once per device), the accuracy predictor, the exact front solver, and plan
proposals that fill the gaps of the measured front."""
from .accuracy import make_predictor
from .cost_model import AdditiveCostModel, kv_bytes_per_sequence
from .propose import propose_plans
from .serving_cost import ServingCostModel, serving_cost_model
from .solver import FrontSolver, front_over_views

__all__ = ["AdditiveCostModel", "FrontSolver", "ServingCostModel", "front_over_views", "kv_bytes_per_sequence",
           "make_predictor", "propose_plans", "serving_cost_model"]
