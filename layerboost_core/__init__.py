"""LayerBoost core library: plans, attention options, family adapters, patching, data, bank."""
from .errors import UserError
from .hybrid_folder import load_hybrid
from .plan import LayerPlan, load_plan

__all__ = ["LayerPlan", "UserError", "load_hybrid", "load_plan"]
