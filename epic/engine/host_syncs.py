"""Which tensor operations make the host wait for the device, found on any device (a CPU test catches a GPU stall).

On CUDA the host stalls until the GPU has caught up whenever it needs a value computed there:

* a scalar read: ``.item()``, ``float()``, ``int()``, ``bool()`` (``if t:``), ``torch.equal`` -- all end in the
  aten ops tagged ``data_dependent_output`` (``_local_scalar_dense``, ``equal``, ``allclose``);
* an output whose *shape* depends on the data: ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave``
  without ``output_size`` -- aten's ``dynamic_output_shape`` tag -- and boolean-mask indexing ``x[mask]`` /
  ``x[mask] = v`` (aten ``index`` / ``index_put_`` with a bool index run ``nonzero`` inside);
* a copy to the host: ``.tolist()``, ``.cpu()``, ``.numpy()``.

``torch.cuda.set_sync_debug_mode`` reports the first two only on a GPU. ``HostSyncCounter`` records them on every
device: a ``TorchDispatchMode`` inspects every aten call (its tags and, for indexing, the index dtypes) and the
Python-level host reads are wrapped while it is active. Tests run a training step under it on the CPU and assert
the count; ``tools/gpu_check.py`` cross-checks with CUDA's own sync debug mode.
"""
from __future__ import annotations

import traceback
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSync", "HostSyncCounter", "engine_tensors", "op_syncs_host"]

_aten = torch.ops.aten
#: dynamic-shape ops that do not sync with an integer index (aten.index is tagged dynamic for bool masks)
_INDEX_OPS = {_aten.index.Tensor, _aten._unsafe_index.Tensor}
_INDEX_PUT_OPS = {_aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default,
                  _aten._unsafe_index_put.default}
#: Python-level reads that copy a tensor to the host (no aten op on a CPU tensor, a D2H copy on CUDA)
HOST_READ_METHODS = ("tolist", "cpu", "numpy", "__array__")


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def op_syncs_host(func, args) -> bool:
    """Whether this aten call makes the host wait for the device (see the module docstring)."""
    if func in _INDEX_OPS or func in _INDEX_PUT_OPS:
        return _bool_index(args[1] if len(args) > 1 else ())
    tags = getattr(func, "tags", ())
    return torch.Tag.data_dependent_output in tags or torch.Tag.dynamic_output_shape in tags


@dataclass
class HostSync:
    what: str  # aten op or Tensor method
    where: str  # the innermost frame of the caller outside torch, "file:line in function"
    label: Optional[str] = None  # HostSyncCounter.label when it happened (e.g. "step 3, micro 1")

    def __str__(self) -> str:
        return f"{self.what} at {self.where}" + (f" [{self.label}]" if self.label else "")


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name and not name.endswith("/host_syncs.py"):
            return f"{name}:{frame.lineno} in {frame.name}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter(device_tensors) as syncs: ...`` records every host synchronisation in ``syncs.events``.

    ``device_tensors``: the tensors that live on the accelerator in a real run (the batch, the engines' weights and
    optimizer states: see ``engine_tensors``). Only reads of those, and of tensors computed from them, count: a CPU
    test then tells a ``.item()`` of a device value from one of a host scalar (torch's non-fused AdamW keeps its
    step count on the host; a draw of the objective's CPU generator stays on the host). Tensors made by factories
    (``torch.zeros(n, device=x.device)``) start untracked and become tracked once an op writes a tracked value into
    them; a read of a purely factory-made value is missed (say so where it matters). ``None``: every read counts.

    ``label`` (settable inside the block) tags the events, e.g. with the step they belong to. Ops are seen below
    autograd, so backward passes run in the block are covered too (the CPU autograd engine runs them on this
    thread)."""

    def __init__(self, device_tensors: Optional[Iterable[torch.Tensor]] = None) -> None:
        super().__init__()
        self.events: list[HostSync] = []
        self.label: Optional[str] = None
        self._saved: dict = {}
        self._inside_method = False
        self._tracked: Optional[dict] = None if device_tensors is None else {}
        for tensor in device_tensors or ():
            self.track(tensor)

    # -- which tensors are "on the device" ------------------------------------------------------------------------
    def track(self, tensor: torch.Tensor) -> None:
        if self._tracked is None or not isinstance(tensor, torch.Tensor):
            return
        key = id(tensor)
        if key not in self._tracked:
            self._tracked[key] = weakref.ref(tensor, lambda _ref, key=key, tracked=self._tracked: tracked.pop(key, None))
        base = tensor._base
        if base is not None:  # a write through a view changes its base
            self.track(base)

    def on_device(self, tensor) -> bool:
        if not isinstance(tensor, torch.Tensor):
            return False
        if self._tracked is None:
            return True
        ref = self._tracked.get(id(tensor))
        return ref is not None and ref() is tensor

    # -- recording ------------------------------------------------------------------------------------------------
    def _record(self, what: str) -> None:
        self.events.append(HostSync(what, _caller(), self.label))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_device = any(self.on_device(t) for t in inputs)
        if from_device and not self._inside_method and op_syncs_host(func, args):
            self._record(str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func))
        out = func(*args, **kwargs)
        if from_device and self._tracked is not None:
            for tensor in pytree.tree_leaves(out):
                self.track(tensor)
            if torch.Tag.inplace in getattr(func, "tags", ()) or "out" in kwargs:  # written in place
                self.track(args[0] if torch.Tag.inplace in func.tags else kwargs["out"])
        return out

    def _wrap(self, name: str):
        original = self._saved[name]
        counter = self

        def method(tensor, *args, **kwargs):
            if counter._inside_method:
                return original(tensor, *args, **kwargs)
            if counter.on_device(tensor):
                counter._record(f"Tensor.{name}")
            counter._inside_method = True  # .cpu() then .numpy() of it etc. is one read, not two
            try:
                return original(tensor, *args, **kwargs)
            finally:
                counter._inside_method = False
        return method

    def __enter__(self):
        for name in HOST_READ_METHODS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)
            self._saved = {}

    def count(self, label: Optional[str] = None) -> int:
        return sum(1 for e in self.events if label is None or e.label == label)

    def report(self, label: Optional[str] = None) -> str:
        return "\n".join(str(e) for e in self.events if label is None or e.label == label) or "no host synchronisation"


def engine_tensors(engine) -> list[torch.Tensor]:
    """What a DeepSpeed engine keeps on the accelerator: the module's parameters, buffers and gradients, and its
    optimizer's parameters, flat partitions and state (not the host-side ``step`` of a non-fused torch optimizer)."""
    module = getattr(engine, "module", engine)
    out = [*module.parameters(), *module.buffers()]
    out += [p.grad for p in module.parameters() if p.grad is not None]
    wrapper = getattr(engine, "optimizer", None)
    inner = getattr(wrapper, "optimizer", wrapper)
    for optimizer in {id(o): o for o in (wrapper, inner) if o is not None}.values():
        for name in ("bit16_groups_flat", "single_partition_of_fp32_groups"):
            out += [t for t in getattr(optimizer, name, ()) if isinstance(t, torch.Tensor)]
        for group in getattr(optimizer, "param_groups", ()):
            out += list(group["params"])
            on_device_step = group.get("fused") or group.get("capturable")
            for param in group["params"]:
                state = getattr(optimizer, "state", {}).get(param, {})
                out += [v for k, v in state.items() if isinstance(v, torch.Tensor) and (k != "step" or on_device_step)]
    return out
