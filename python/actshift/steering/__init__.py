"""Activation steering: plans, banks, activation extraction, recipes and file formats."""
from .extract import extract_activations
from .plan import SteeringBank, SteeringPlan

__all__ = ["SteeringPlan", "SteeringBank", "extract_activations"]
