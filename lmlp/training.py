"""The Python API of training under its earlier module name; the code lives in ``lmlp.train``."""

from lmlp.train import (
    TrainingResult,
    build_model,
    closest_pair_distance,
    fingerprints,
    format_table,
    load_extra_test,
    load_training_data,
    train,
)

__all__ = [
    "TrainingResult",
    "build_model",
    "closest_pair_distance",
    "fingerprints",
    "format_table",
    "load_extra_test",
    "load_training_data",
    "train",
]
