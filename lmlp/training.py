"""The Python API of training under its earlier module name; the code lives in ``lmlp.train``."""

from lmlp.train import *  # noqa: F401,F403
from lmlp.train import __all__  # noqa: F401
