"""GPU fast-path helpers every model family uses: activation checkpointing and torch.compile with a fallback.

Activation checkpointing (``train.activation_checkpointing``) keeps only each block's input and recomputes the
block in backward (one more forward of the checkpointed parts, far less activation memory, so larger micro batches
fit). Where a library has its own switch we use it: timm's ``set_grad_checkpointing`` (every ViT block),
HF transformers' ``gradient_checkpointing_enable`` (every text layer, ``use_reentrant=False``). A family's own
layer loops (METER's fusion layers) call :func:`checkpointed` on each layer and expose a ``grad_checkpointing``
flag; :func:`set_activation_checkpointing` sets all three kinds in one call. The RNG state is saved and restored
around the recomputation (dropout masks are the same), so losses and gradients equal the plain path's.

``torch.compile`` (``train.compile``): :func:`compile_parts` compiles given submodules in place (each module's
``forward``; parameter names and the state dict do not change). torch.compile is lazy, so a part that fails to
compile fails at its first call: the guard then logs one line naming the part and the error and runs that part
eagerly from then on; an error that the eager forward raises too is a real error and propagates.

A family adds itself by giving its layer stacks a ``grad_checkpointing`` attribute (the loop calls
``checkpointed(layer, ..., enabled=self.grad_checkpointing and self.training)``) and, for compile, a
``compile_parts()`` method returning {name: module} (see ``epic.models.meter.METER``).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


def checkpointed(fn: Callable, *args, enabled: bool, **kwargs):
    """``fn(*args, **kwargs)``, with its activations recomputed in backward when ``enabled`` and grads are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> list[str]:
    """Switch checkpointing for every part of ``model`` that has a switch; returns the names of those parts.

    timm models (``set_grad_checkpointing``), HF ``PreTrainedModel``s (``gradient_checkpointing_enable``, non
    re-entrant) and modules with a ``grad_checkpointing`` attribute (a family's own layer loops).
    """
    from transformers import PreTrainedModel

    switched, handled = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in handled):
            continue  # inside a tower already switched as a whole
        if isinstance(module, PreTrainedModel):
            _hf_checkpointing(module, enabled)
        elif module is not model and callable(getattr(module, "set_grad_checkpointing", None)):
            module.set_grad_checkpointing(enabled)  # timm
        elif hasattr(module, "grad_checkpointing"):
            module.grad_checkpointing = enabled
        else:
            continue
        switched.append(name or type(module).__name__)
        if name:
            handled.append(name)
    return switched


def _hf_checkpointing(model, enabled: bool) -> None:
    """HF's switch: ``activation_checkpointing_*`` in transformers >= 5.2x, ``gradient_checkpointing_*`` before."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if enabled:
        getattr(model, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


# Exceptions that are control flow, not failures: non-reentrant checkpointing raises this inside the recomputed
# forward (here: the compiled part) once it has recomputed what backward needs, and catches it outside.
_CONTROL_FLOW = tuple(e for e in (getattr(torch.utils.checkpoint, "_StopRecomputationError", None),) if e is not None)


class CompiledForward:
    """A module's forward run through torch.compile, falling back to eager (once, logged) if compiling fails."""

    def __init__(self, name: str, eager: Callable, compiled: Callable):
        self.name, self.eager, self.compiled = name, eager, compiled
        self.status = "pending"  # "compiled" after the first successful call, "eager (...)" after a fallback

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as err:  # torch.compile fails at the first call: Dynamo, Inductor, a backend, Triton ...
            if isinstance(err, _CONTROL_FLOW):  # activation checkpointing stops a recomputation this way
                raise
            out = self.eager(*args, **kwargs)  # raises if it is the call itself that is wrong
            self.compiled = None
            self.status = f"eager ({type(err).__name__})"
            logger.warning("train.compile: %s did not compile (%s: %s); it runs eagerly", self.name,
                           type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")
            return out
        self.status = "compiled"
        return out


def compile_parts(parts: Dict[str, Union[nn.Module, Tuple[nn.Module, str]]], backend: str = "inductor",
                  mode: Optional[str] = None, compiler: Callable = torch.compile) -> Dict[str, CompiledForward]:
    """Compile each part in place (see the module docstring); returns the guards by part name.

    A part is a module (its ``forward`` is compiled) or (module, method name), for a tower the model calls
    through another method (METER calls the timm ViT's ``forward_features``).
    """
    guards = {}
    for name, part in parts.items():
        module, method = part if isinstance(part, tuple) else (part, "forward")
        eager = getattr(module, method)
        try:
            compiled = compiler(eager, backend=backend, mode=mode)
        except Exception as err:  # e.g. a backend that does not exist on this machine
            logger.warning("train.compile: %s cannot be compiled (%s: %s); it runs eagerly", name,
                           type(err).__name__, err)
            compiled = None
        guard = CompiledForward(name, eager, compiled)
        if compiled is None:
            guard.status = "eager (not compiled)"
        setattr(module, method, guard)
        guards[name] = guard
    return guards


def compile_report(guards: Dict[str, CompiledForward]) -> str:
    """One line: which parts run compiled and which fell back (for the log after the first step)."""
    return ", ".join(f"{name}: {guard.status}" for name, guard in guards.items())
