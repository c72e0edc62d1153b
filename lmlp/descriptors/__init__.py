"""Atomic-environment descriptors: eeACSFs and plain ACSFs on flat atom arrays."""

from lmlp.descriptors.eeacsf import CentreDerivatives, Derivatives, SymmetryFunctions, acsf_weights, eeacsf_weights
from lmlp.descriptors.neighbors import Neighbors, find_neighbors, find_triples
from lmlp.descriptors.standardize import Standardizer

__all__ = [
    "CentreDerivatives",
    "Derivatives",
    "Neighbors",
    "Standardizer",
    "SymmetryFunctions",
    "acsf_weights",
    "eeacsf_weights",
    "find_neighbors",
    "find_triples",
]
