"""Datasets: 2-D toy densities (with the true density of the mixtures), toy classification sets,
scikit-learn's digits, the MAF tabular benchmarks from a local folder, and sample metrics."""
from .classification import CLASSIFICATION_DATASETS, classification
from .digits import DIGITS_DIM, DIGITS_LEVELS, DIGITS_SCALE, digits
from .metrics import DEFAULT_KS, ModeCoverage, describe_modes, mode_coverage
from .mixture import GaussianMixture
from .tabular import DATA_ENV, TABULAR_FILES, tabular
from .toy import MIXTURES, TOY_DATASETS, mixture, normalization, toy, true_entropy

__all__ = [
    "toy", "mixture", "true_entropy", "normalization", "GaussianMixture", "TOY_DATASETS", "MIXTURES",
    "classification", "CLASSIFICATION_DATASETS",
    "digits", "DIGITS_DIM", "DIGITS_LEVELS", "DIGITS_SCALE",
    "tabular", "TABULAR_FILES", "DATA_ENV",
    "mode_coverage", "ModeCoverage", "describe_modes", "DEFAULT_KS",
]
