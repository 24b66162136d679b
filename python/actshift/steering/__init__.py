"""Activation steering: plans, banks, activation extraction, recipes and file formats."""
from .aggregators import AGGREGATORS, aggregate, logistic_direction
from .datasets import make_pairs, truncated_suffixes
from .extract import extract_activations
from .formats import export_gguf, import_gguf, load, save
from .plan import SteeringBank, SteeringPlan
from .recipes import (
    ConditionalSteering,
    ablate_direction,
    ablation_sites,
    actadd_sites,
    actadd_vectors,
    affine_plan,
    caa_vectors,
    cast_similarity,
    compose,
    fit_affine,
    mean_difference,
    PersonaMonitor,
    monitor_sites,
    neuron_plan,
    neuron_scores,
    normalize_vector,
    pca_direction,
    pca_vectors,
    plans_from_vectors,
    select_neurons,
)
from .vector import SteeringVector

__all__ = [
    "SteeringPlan", "SteeringBank", "extract_activations", "save", "load", "export_gguf", "import_gguf",
    "mean_difference", "pca_direction", "caa_vectors", "pca_vectors", "plans_from_vectors",
    "actadd_vectors", "actadd_sites", "ablation_sites", "ablate_direction", "fit_affine", "affine_plan",
    "neuron_scores", "select_neurons", "neuron_plan", "cast_similarity", "ConditionalSteering",
    "monitor_sites", "PersonaMonitor", "compose", "normalize_vector",
    "SteeringVector", "aggregate", "AGGREGATORS", "logistic_direction", "make_pairs", "truncated_suffixes",
]
