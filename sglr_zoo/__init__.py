"""sglr_zoo: adversarially robust timm models trained with SGLR (Self-Guided Label Refinement)."""

from sglr_zoo import models  # noqa: F401  (registers our architectures in timm)
from sglr_zoo.errors import UserError
from sglr_zoo.zoo import list_models, load

__version__ = "0.1.0"
__all__ = ["UserError", "__version__", "list_models", "load"]
