"""Fused ops for EPIC: each file holds the Triton kernel(s), the PyTorch reference and the dispatching function.

The EPIC code calls only these three functions; they pick Triton for CUDA tensors and the reference otherwise
(``EPIC_KERNELS=reference|triton`` forces a path, see :mod:`epic.kernels.dispatch`).
"""
from .saliency_mask import saliency_mask
from .token_consistency import token_consistency_loss
from .vocab_sample import vocab_sample_and_loss

__all__ = ["token_consistency_loss", "saliency_mask", "vocab_sample_and_loss"]
