"""protoreg: zero-shot, interpretable human recognition by 2D-3D registration.

The `protoreg` package holds what both halves share: the part taxonomy, the body models,
identities, prototypes, the dataset format, and the command-line group.
"""

__version__ = "0.1.0"
