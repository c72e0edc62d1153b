"""Reference data: labellers (GFN2-xTB, DFT) and the SN2 data-set generator."""

from lmlp.reference.labellers import (
    LabelFailure,
    Labeller,
    PySCFLabeller,
    XTBCalculator,
    XTBLabeller,
    get_labeller,
    label_structures,
)
from lmlp.reference.sn2 import GenerationReport, SamplingProtocol, generate_sn2

__all__ = [
    "GenerationReport",
    "LabelFailure",
    "Labeller",
    "PySCFLabeller",
    "SamplingProtocol",
    "XTBCalculator",
    "XTBLabeller",
    "generate_sn2",
    "get_labeller",
    "label_structures",
]
