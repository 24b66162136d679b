"""Activation steering: plans, banks, and (later) recipes built on the fused `steer` op."""
from .plan import SteeringBank, SteeringPlan

__all__ = ["SteeringPlan", "SteeringBank"]
