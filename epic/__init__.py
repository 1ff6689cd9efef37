"""EPIC: per image-token consistency for vision-language pretraining, at scale (DeepSpeed ZeRO-2)."""

__version__ = "0.1.0"

# Registers every model family's config dataclass with epic.config (import paths only: no family is imported).
from epic.models import registry as _registry  # noqa: E402,F401
