"""Expert LoRA on an experts module that runs eagerly: transformers' eager loop, or any experts
implementation called outside the compiled graphs.

transformers' default experts loop (``experts_implementation="eager"``) never reaches a compiled
graph: dynamo breaks the graph at its ``nonzero`` and runs the loop over the experts eagerly
(inside frames dynamo resumes, where no module hook runs). So such a module (:func:`guard`)
runs without dynamo, under a torch function mode that gives each read
of an adapted 3-D parameter W (E, out, in) its update, from the adapter as the backend holds it now
(trained A / B, scale, disabled; see ``LoraState.live_weights``):

- ``F.linear(x, W[e])`` (the eager loop) and ``bmm(W[ids], x)`` (``batched_mm``): branch mode adds
  ``((x A_e^T) * scale) B_e^T`` to the rows routed to expert e, nothing else;
- any other read of a gathered ``W[idx]`` (and every read in fold mode) sees
  ``W[idx] + scale * B[idx] A[idx]``, the gathered experts' fold;
- any other read of W itself (``grouped_mm``'s ``W.transpose(-2, -1)``) sees
  ``W' = W + scale * B_e A_e`` for every expert, PEFT's ParamWrapper formula.

Every form is PEFT's ``x W'[e]^T`` for each routed row; autograd reaches A / B.
"""

from __future__ import annotations

import copyreg
import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import GraphRewriteError
from .experts import expert_factors, implementation

TRACEABLE = ("grouped_mm", "batched_mm")  # read inside the compiled graphs (lora_fx.passes.experts)


def runs_eagerly(module: torch.nn.Module) -> bool:
    """Whether an experts module computes with an implementation dynamo cannot keep in a graph."""
    return implementation(module) not in TRACEABLE

LINEAR = (F.linear, torch._C._nn.linear)
BMM = (torch.bmm, torch.Tensor.bmm)
GETITEM = (torch.Tensor.__getitem__,)
METADATA = (torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride)


class ExpertUpdates(TorchFunctionMode):
    """While one experts module runs eagerly: every read of its adapted parameters gets the update.

    ``params``: id(parameter) -> (parameter, [(A (E, r, in), B (E, out, r), scale), ...]), one
    triple per summed adapter; ``fold``: fold every read (fold mode) instead of adding the routed
    branch where the read is a per-expert matmul."""

    def __init__(self, params: dict[int, tuple[torch.Tensor, list]], fold: bool):
        super().__init__()
        self.params, self.fold = params, fold
        self.gathered: dict[int, tuple[weakref.ref, list, Any]] = {}  # id(W[idx]) -> (it, factors, idx)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA or getattr(func, "__name__", "") == "__get__":  # .shape, .dtype, size(): no values
            return func(*args, **kwargs)
        if func in GETITEM and id(args[0]) in self.params and args[0] is self.params[id(args[0])][0]:
            factors, idx = self.params[id(args[0])][1], args[1]
            out = func(*args, **kwargs)
            if self.fold:
                return out + _delta(factors, idx, out.dtype)
            self.gathered[id(out)] = (weakref.ref(out), factors, idx)
            return out
        if func in LINEAR and len(args) >= 2 and (g := self._gathered(args[1])) is not None:
            x = args[0]  # (S, in) rows routed to expert idx; W[idx] (out, in)
            return func(*args, **kwargs) + _routed(x, *g, lambda h, t: h @ t.transpose(-2, -1))
        if func in BMM and (g := self._gathered(args[0])) is not None:
            x = args[1]  # (S, in, 1), W[ids] (S, out, in)
            return func(*args, **kwargs) + _routed(x, *g, torch.bmm)
        args, kwargs = torch.utils._pytree.tree_map(self._folded, (args, kwargs))
        return func(*args, **kwargs)

    def _gathered(self, t: Any) -> tuple[list, Any] | None:
        entry = self.gathered.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1:] if entry is not None and entry[0]() is t else None

    def _folded(self, t: Any) -> Any:
        """A read that is no per-expert matmul: the tensor with the update folded in."""
        if not isinstance(t, torch.Tensor):
            return t
        if (g := self._gathered(t)) is not None:
            return t + _delta(g[0], g[1], t.dtype)
        entry = self.params.get(id(t))
        if entry is not None and entry[0] is t:
            return t + _delta(entry[1], slice(None), t.dtype)
        return t


def _delta(factors: list, idx: Any, dtype: torch.dtype) -> torch.Tensor:
    """scale * B[idx] @ A[idx] summed over the adapters, in the parameter's dtype (as PEFT folds)."""
    return sum((b[idx].to(dtype) @ a[idx].to(dtype)) * s for a, b, s in factors)


def _routed(x: torch.Tensor, factors: list, idx: Any, matmul) -> torch.Tensor:
    """((x A[idx]^T) * scale) B[idx]^T summed over the adapters, in x's dtype (``matmul(w, x)``:
    the read's own matmul, weights first for bmm, input first for linear)."""
    out = None
    for a, b, s in factors:
        xa = x.to(a.dtype)
        if matmul is torch.bmm:  # x (S, in, 1)
            part = torch.bmm(b[idx], torch.bmm(a[idx], xa) * s)
        else:  # x (S, in)
            part = matmul(matmul(xa, a[idx]) * s, b[idx])
        out = part if out is None else out + part
    return out.to(x.dtype)


def guard(module: torch.nn.Module, owner: object, updates: Callable[[], tuple[dict, bool]]) -> None:
    """Give ``module`` (an experts module computing with the eager loop) the update of backend
    ``owner`` (its EagerGuard) at every call: ``updates()`` gives the ``ExpertUpdates`` arguments
    for one call. Its class becomes a subclass (one per class, so repeated layers keep sharing
    dynamo's graphs) whose ``forward`` runs the module's own without dynamo, under the mode;
    :func:`unguard` gives the class back once no backend guards it."""
    _GUARDS.setdefault(module, {})[id(owner)] = updates
    if not getattr(type(module), "_lora_fx_eager_experts", False):
        module.__class__ = _guarded_class(type(module))


def unguard(module: torch.nn.Module, owner: object) -> None:
    owners = _GUARDS.get(module, {})
    owners.pop(id(owner), None)
    if not owners and getattr(type(module), "_lora_fx_eager_experts", False):
        _GUARDS.pop(module, None)
        module.__class__ = type(module)._lora_fx_base


def running(owner: object) -> None:
    """A compiled graph of backend ``owner`` runs in this thread: the experts modules that run
    eagerly next (between its graphs) are its call's."""
    _LOCAL.owner = id(owner)


_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> id(EagerGuard) -> updates
_LOCAL = threading.local()


@functools.cache
def _guarded_class(cls: type) -> type:
    def __reduce_ex__(self, protocol):  # pickled, deep-copied as the class it was: a backend does not travel
        return copyreg._reconstructor, (cls, object, None), self.__getstate__()

    return type(cls.__name__, (cls,), {"forward": _forward, "_lora_fx_eager_experts": True, "_lora_fx_base": cls,
                                       "__reduce_ex__": __reduce_ex__,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


@torch._dynamo.disable
def _forward(self, *args, **kwargs):
    """A guarded experts module's forward: its own, run without dynamo, under the mode with the
    update of the backend whose graphs this call runs (the only one, when one guards it)."""
    base = type(self)._lora_fx_base
    owners = _GUARDS.get(self) or {}
    updates = owners.get(getattr(_LOCAL, "owner", None)) or (next(iter(owners.values())) if len(owners) == 1
                                                              else None)
    if updates is None:
        if owners:
            raise GraphRewriteError(f"{type(self).__name__} (an experts module with expert LoRA from {len(owners)} "
                                    "backends) ran eagerly outside any backend's compiled call, so which adapter "
                                    "applies is not known; call it through the compiled model")
        return base.forward(self, *args, **kwargs)
    params, fold = updates()
    with ExpertUpdates(params, fold):
        return base.forward(self, *args, **kwargs)


def factors_of(weights: list, experts: int) -> list:
    """(A (E, r, in), B (E, out, r), scale) of each summed expert LoRA (``LoraWeights``)."""
    return [(*expert_factors(w.lora_a, w.lora_b, experts), w.scale) for w in weights]
