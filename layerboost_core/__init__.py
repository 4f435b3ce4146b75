"""LayerBoost core library: plans, attention options, family adapters, patching, data, bank."""
from .errors import UserError
from .plan import LayerPlan, load_plan

__all__ = ["LayerPlan", "UserError", "load_plan"]
