"""EPIC: per image-token consistency for vision-language pretraining, at scale (DeepSpeed ZeRO-2)."""

__version__ = "0.1.0"
