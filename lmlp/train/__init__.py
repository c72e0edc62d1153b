"""Training an HDNNP ensemble (docs/method.md: one training epoch, lifelong adaptive data selection, continual learning), one module per concern:

- ``run``: ``train``, a run from a config end to end (set-up, resume, continue, final results);
- ``trainer``: the epoch loop (``Trainer``), with ``epoch`` (one epoch of fitting),
  ``early_stopping`` and ``guard`` (the divergence guard);
- ``data``: the run's structures and splits; ``caches``: their descriptor caches;
- ``build``: a fresh ensemble and its optimizer; ``continual``: continued runs;
- ``checkpoint``: the versioned ``checkpoint_last.pt``; ``rundir``: the other files of the run
  directory; ``log``: train.log and the terminal; ``result``: ``TrainingResult`` and its table.
"""

from lmlp.train.build import build_model
from lmlp.train.checkpoint import Checkpoint
from lmlp.train.data import TrainingData, closest_pair_distance, fingerprints, load_extra_test, load_training_data
from lmlp.train.result import TrainingResult, format_table
from lmlp.train.run import train

__all__ = [
    "Checkpoint",
    "TrainingData",
    "TrainingResult",
    "build_model",
    "closest_pair_distance",
    "fingerprints",
    "format_table",
    "load_extra_test",
    "load_training_data",
    "train",
]
