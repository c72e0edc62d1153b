"""Shared fixtures."""

import pytest
from factories import random_molecules

from lmlp.data import StructureSet


@pytest.fixture
def molecules() -> StructureSet:
    """20 random 6- and 7-atom molecules with a stored 80/20 split."""
    return random_molecules()
