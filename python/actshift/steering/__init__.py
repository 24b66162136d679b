"""Activation steering: plans, banks, activation extraction, recipes and file formats."""
from .extract import extract_activations
from .formats import export_gguf, import_gguf, load, save
from .plan import SteeringBank, SteeringPlan

__all__ = ["SteeringPlan", "SteeringBank", "extract_activations", "save", "load", "export_gguf", "import_gguf"]
