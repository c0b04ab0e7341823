"""Which tensors hold an adapter that a lora_fx backend folded into them in place.

An in-place fold writes W' = W + s B A into the model's own weight. Any other backend (any mode)
or ``rewrite`` that met such a weight would take W' for the base and apply its adapter on top of
the first one, silently. Every merge is recorded here, by tensor, with the state that made it;
others refuse it, naming the module and the fix (``restore()`` on the backend that merged it).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch

from .tensors import address

_MERGED: dict[tuple, tuple[weakref.ref, weakref.ref, str]] = {}  # (storage address, shape) -> (tensor, owner, module)
EPOCH = [0]  # bumped at every merge, so a compiled call checks its weights again only after one


def _key(t: torch.Tensor) -> tuple:
    return address(t), tuple(t.shape)  # by storage: a tensor sharing the merged one's data holds the merge too


def record_merge(tensors: Iterable[torch.Tensor | None], owner: Any, fqn: str, merged: bool) -> None:
    """Note that ``tensors`` now hold (``merged``) or no longer hold ``owner``'s in-place fold."""
    for t in tensors:
        if t is None:
            continue
        key = _key(t)
        if merged:
            _MERGED[key] = (weakref.ref(t, lambda _, key=key: _MERGED.pop(key, None)), weakref.ref(owner), fqn)
            EPOCH[0] += 1
        else:
            entry = _MERGED.get(key)
            if entry is not None and entry[0]() is t:
                del _MERGED[key]


def merged_by_other(t: Any, owner: Any) -> str | None:
    """The module whose in-place fold ``t`` holds, when a state other than ``owner`` made it."""
    entry = _MERGED.get(_key(t)) if isinstance(t, torch.Tensor) and _MERGED else None
    if entry is None or entry[0]() is None:
        return None
    state = entry[1]()
    return None if state is None or state is owner else entry[2]


def merged_problem(fqn: str, what: str, holder: str) -> str:
    return (f"{fqn}: its {what} holds an adapter that another lora_fx backend folded into it in place (module "
            f"{holder}), so this one would apply its adapter on top of that one; call restore() on the in-place "
            "backend first (it puts the model's own weights back), or compile with that backend alone")
