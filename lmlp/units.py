"""The units of lmlp, in one place.

Inside lmlp and in every file it writes: energies eV, lengths Å ("Angstrom" in files), forces
eV/Å, charges e. Reported errors: energies per atom in meV/atom, force components in meV/Å.
The tables name these units as the structure files (``DATA_UNITS``, HDF5 attributes), the model
files (``MODEL_UNITS``) and the metrics files (``METRIC_UNITS``) store them.
"""

ENERGY = "eV"
LENGTH = "Angstrom"
FORCE = "eV/Angstrom"
CHARGE = "e"
ENERGY_ERROR = "meV/atom"
"""Unit of reported energy errors (per atom)."""
FORCE_ERROR = "meV/Angstrom"
"""Unit of reported force errors (per Cartesian component)."""

DATA_UNITS = {"energy_unit": ENERGY, "length_unit": LENGTH, "force_unit": FORCE, "charge_unit": CHARGE}
"""The unit attributes of an lmlp HDF5 structure file."""
MODEL_UNITS = {"energy": ENERGY, "length": LENGTH, "forces": FORCE}
"""The ``units`` entry of a model file."""
METRIC_UNITS = {"energy": ENERGY_ERROR, "forces": FORCE_ERROR}
"""The ``units`` entry of metrics.json, evaluation tables and uncertainty reports."""
