"""Continuous-depth models: vector fields, neural ODEs, continuous normalizing flows.

Importing this package imports torch and torchdiffeq only (no matplotlib, no triton).
"""
from .cnf import CNF, NOISES, TRACES
from .node import NeuralODE, ODEClassifier
from .vector_field import ACTIVATIONS, ConcatLinear, ConcatSquashLinear, MLPVectorField

__all__ = [
    "MLPVectorField", "ConcatLinear", "ConcatSquashLinear", "NeuralODE", "ODEClassifier", "CNF",
    "ACTIVATIONS", "TRACES", "NOISES",
]
