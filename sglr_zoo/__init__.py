"""sglr_zoo: adversarially robust timm models trained with SGLR (Self-Guided Label Refinement)."""

from sglr_zoo import models  # noqa: F401  (registers our architectures in timm)
from sglr_zoo.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
