"""MoE router steering: expert plans and banks (plan.py), the transformers router patch
(patch.py, used by `actshift.patch(model, experts=...)`), and the recipes (recipes.py)."""
from .plan import ExpertBank, ExpertPlan

__all__ = ["ExpertPlan", "ExpertBank"]
