"""Which implementation runs an op (Triton kernel or PyTorch reference), plus the small pieces both share.

Rules (read at every call, so tests can switch with ``monkeypatch.setenv``):

* ``EPIC_KERNELS`` unset or ``auto``: Triton when every tensor is on CUDA and Triton is installed, else reference.
* ``EPIC_KERNELS=reference``: always the PyTorch reference.
* ``EPIC_KERNELS=triton``: always Triton. CPU tensors then need Triton's interpreter, which only works when
  ``TRITON_INTERPRET=1`` was set *before* ``triton`` was first imported (Triton decides at decoration time;
  e.g. ``import timm`` already imports triton). :func:`interpreter_active` tells whether that happened.

Randomness: Triton kernels draw uniforms with Philox (``tl.rand(seed, offset)``), PyTorch with its own generator,
so the two paths give different (equally distributed) samples unless explicit noise is passed.
:func:`draw_seed` turns a ``torch.Generator`` (or the default generator) into a Philox seed on the device without a
host synchronisation, which keeps the Triton path reproducible under ``torch.manual_seed``.
"""
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # e.g. macOS wheels of torch ship no Triton: kernels are defined but never launched

    class _NoTriton:
        """Stands in for ``triton`` and ``triton.language`` so the kernel modules import without Triton."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(int(n) - 1, 0).bit_length()

    triton = tl = _NoTriton()
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton", "tl", "use_triton", "interpreter_active", "draw_seed", "gumbel_from_uniform",
           "UNIFORM_MIN", "UNIFORM_MAX"]

# Uniforms are clamped into [UNIFORM_MIN, UNIFORM_MAX] before the Gumbel transform -log(-log u), in both paths:
# u = 0 would give -inf and u = 1 would give +inf. The bounds are the smallest normal fp32 and the largest fp32 < 1,
# so the Gumbel noise lies in [-4.47, 16.64].
UNIFORM_MIN = 1.1754943508222875e-38
UNIFORM_MAX = 0.99999994039535522

_BACKENDS = ("auto", "reference", "triton")


def interpreter_active() -> bool:
    """True when Triton was imported with ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.rand, InterpretedFunction)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path should run for these inputs (see the module docstring for the rules)."""
    choice = os.environ.get("EPIC_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"EPIC_KERNELS={choice!r} is not one of {_BACKENDS}; unset it or pick one of those.")
    if choice == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "auto":
        return on_cuda and HAS_TRITON
    if not HAS_TRITON:
        raise RuntimeError("EPIC_KERNELS=triton but triton is not installed; install triton or use "
                           "EPIC_KERNELS=reference.")
    if not on_cuda and not interpreter_active():
        raise RuntimeError("EPIC_KERNELS=triton with CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before anything imports triton (torch._dynamo and timm do), or use CUDA tensors.")
    return True


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A Philox seed as an int64 [1] tensor on ``device``, drawn from ``generator`` (default: the device's default
    generator) without synchronising the host."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise g = -log(-log u) in fp32, u clamped as described at ``UNIFORM_MIN``."""
    u = u.float().clamp(UNIFORM_MIN, UNIFORM_MAX)
    return -torch.log(-torch.log(u))
