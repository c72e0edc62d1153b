"""Structure data: the in-memory ``StructureSet``, the HDF5 layout, validation and conversion.

See ``lmlp.data.hdf5`` for the file layout.
"""

from lmlp.data.convert import convert, load, read_ase, write_extxyz
from lmlp.data.hdf5 import Summary, read_structures, summarize, write_structures
from lmlp.data.structures import SPLITS, StructureSet, concatenate, resplit, split_indices, stratified_split
from lmlp.data.validate import Problem, validate

__all__ = [
    "SPLITS",
    "Problem",
    "StructureSet",
    "Summary",
    "concatenate",
    "convert",
    "load",
    "read_ase",
    "read_structures",
    "resplit",
    "split_indices",
    "stratified_split",
    "summarize",
    "validate",
    "write_extxyz",
    "write_structures",
]
