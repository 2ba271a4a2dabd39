"""Model families, one file each; importing this package registers them by name."""

from hetcomp_dist.models import cml, item_ae, lightgcn, mf, neumf, vae  # noqa: F401  (registration)
from hetcomp_dist.models.base import MODELS, build

__all__ = ["MODELS", "build"]
