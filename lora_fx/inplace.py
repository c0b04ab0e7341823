"""In-place fold: merged into the model's own weights, and which tensors hold such a merge.

An in-place fold writes W' = W + s B A into the model's own weight. Any other backend (any mode)
or ``rewrite`` that met such a weight would take W' for the base and apply its adapter on top of
the first one, silently. Every merge is recorded here, by tensor, with the state that made it;
others refuse it, naming the module and the fix (``restore()`` on the backend that merged it).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .derived import Derived, stamp
from .errors import StaleWeightError, raise_if
from .tensors import address, fold_tensors

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


class InPlaceFold:
    """``LoraState``'s in-place fold: merge into the model's weights, put them back, notice changes
    lora_fx did not make (a mixin: the state's own attributes)."""

    def _substituted_ids(self) -> set[int]:
        """The tensors lora_fx substitutes for the model's (its own; see ``_refresh_in_place``)."""
        return {id(t) for o in self.derived.values() if o.kind == "override" for t in o.tensors.values()}

    def _refresh_in_place(self, d: Derived) -> None:
        weight, bias = d.base
        # the model's tensors are saved and put back; a substituted tensor (lora_fx's own: a saved bias
        # or embedding) is recomputed by its own set first, before this one merges into it
        owned = self._substituted_ids()
        model_own = [None if t is None or id(t) in owned else t for t in d.base]
        if d.merged:
            self.originals.restore(d.key, model_own)
            d.merged = False
            d.saved = stamp(model_own)
        m = self._multiplier
        ws = self.adapters.weights(0, d.key) if m else []
        if "bias" in d.tensors:
            from .state import _follow_weight

            _follow_weight(d, weight)
            d.tensors["bias"].zero_()
        if not ws:
            return
        if d.saved != stamp(model_own):  # first merge, or the base was changed while not merged
            self.originals.save(d.key, model_own)
            d.saved = stamp(model_own)
        fresh = fold_tensors(ws, d.kind, weight, bias, m)
        weight.copy_(fresh["weight"])
        if "bias" in fresh:
            (bias if bias is not None else d.tensors["bias"]).copy_(fresh["bias"])
        d.merged = True

    def _holds_merge(self, d: Derived) -> bool:
        """Whether ``d``'s weights still hold exactly the merge lora_fx wrote."""
        owned = self._substituted_ids()
        if any(t is not None and id(t) in owned for t in d.base):
            return True  # merged into a tensor of lora_fx's own (see _refresh_in_place): nothing else writes it
        originals = [None if t is None else torch.empty_like(t) for t in d.base]
        self.originals.restore(d.key, originals)
        m = self._multiplier
        fresh = fold_tensors(self.adapters.weights(0, d.key) if m else [], d.kind, originals[0], originals[1], m)
        weight, bias = d.base
        held = bias if bias is not None else d.tensors.get("bias")
        return torch.equal(fresh["weight"], weight) and ("bias" not in fresh or torch.equal(fresh["bias"], held))

    def _check_in_place(self, ds: Sequence[Derived], bases: Sequence[tuple] | None = None) -> None:
        """Raise if a weight holding an in-place merge was changed or replaced by someone else.
        ``bases``: the tensors a call reads for each (default: those merged into); while not merged,
        tensors the model now holds instead are the new base."""
        bases = [d.base for d in ds] if bases is None else bases
        stale = [d.key for d, base in zip(ds, bases) if d.merged and stamp(base) != d.stamp]
        raise_if(stale, StaleWeightError,
                 "changed (edited in place, loaded, replaced or moved) while holding the adapter folded in place; "
                 "lora_fx cannot tell a new base weight from the merged one. Call be.restore() (it puts back the "
                 "weights lora_fx saved, undoing an in-place change in these modules only; a tensor that replaced "
                 "a merged one is kept as the new base), make an in-place change again (e.g. load the state dict "
                 "again), then be.enable(); next time call be.restore() before changing the weights:")
        for d, base in zip(ds, bases):
            if not d.merged and any(t is not b for t, b in zip(base, d.base)):
                d.base, d.generation = tuple(base), -1  # merged into at the next refresh
            elif not d.merged and d.generation == self.generation:
                d.stamp = stamp(d.base)  # the base itself was changed while not merged: it is the new base
