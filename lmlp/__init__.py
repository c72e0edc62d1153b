"""lmlp: lifelong machine learning potentials.

Ensembles of high-dimensional neural network potentials on element-embracing atom-centred
symmetry functions, trained with the CoRe optimizer and lifelong adaptive data selection.
Units inside: eV, Å, eV/Å.
"""

__version__ = "0.1.0"
