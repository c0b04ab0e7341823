"""Derived tensors: the ones computed from the adapters, the settings and the base weight.

``Derived`` is one module's set (scale, lora_bias, DoRA's coefficients, fold's W', a substituted
parameter) for one placement of its base weight; ``stamp`` identifies the contents of the base
tensors it was computed from. ``Builders`` allocates and computes them for fold and branch mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .distributed import _copy_full, _full, _local
from .quantized import quant_format, requantized
from .slots import ModuleSpec
from .tensors import (
    IDENTITY,
    address,
    as_out_in,
    bias_parts,
    dora_coefficients,
    dora_delta,
    fold_tensors,
    lora_bias,
    rank_scale,
)


def stamp(tensors: Sequence[torch.Tensor | None]) -> tuple:
    """What identifies the contents of ``tensors``: version counters and storage addresses (a
    DTensor's own counter moves on in-place ops on it, its local shard's on writes to the shard)."""
    return tuple((t._version, _local(t)._version, address(t)) for t in tensors if t is not None)


class Derived:
    """The derived tensors of one module (or substituted parameter) for one base placement.

    ``base`` are the base tensors it is computed from (weight, bias; or the parameter a
    substitute replaces), as the graph that made it saw them; ``watch``: whether its values
    depend on them (fold, DoRA, substitutes), so edits to them must be noticed.
    """

    def __init__(self, key: str, kind: str, tensors: dict[str, torch.Tensor], base: tuple, watch: bool,
                 also: tuple = ()):
        self.key, self.kind, self.tensors, self.base, self.watch = key, kind, tensors, base, watch
        self.also = also  # more tensors its values come from (DoRA: the current A and B)
        self.generation = -1  # the settings generation its values belong to; -1: never computed
        self.stamp: tuple = ()
        self._merged = False  # in-place fold: the model's weight holds the merge (see ``merged``)
        self.owner: Any = None  # in-place fold: the state that merges it
        self.saved: tuple | None = None  # in-place fold: stamp of the weight when its original was saved
        self.seen = True  # in-place fold: no restore since a call last read ``base`` (see LoraState.update)

    @property
    def merged(self) -> bool:
        return self._merged

    @merged.setter
    def merged(self, value: bool) -> None:
        """Recorded in :mod:`lora_fx.inplace`, so other backends refuse the merged tensors."""
        from .inplace import record_merge  # inplace.py's mixin reads Derived: imported here, once it is defined

        self._merged = value
        record_merge(self.base, self.owner, self.key, value)


class Builders:
    """``LoraState``'s builders of derived tensors (a mixin: the state's own attributes)."""

    def _allocate(self, spec: ModuleSpec, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        t = self._allocate_local(spec, weight, bias)
        if not hasattr(weight, "device_mesh"):
            return t
        # a tensor-parallel weight: what the graph combines with its DTensors is a DTensor too
        from torch.distributed.tensor import DTensor, Replicate

        rep = [Replicate()] * weight.device_mesh.ndim
        mesh = weight.device_mesh
        return {role: v if hasattr(v, "device_mesh") else DTensor.from_local(v, mesh, rep, run_check=False)
                for role, v in t.items()}

    def _allocate_local(self, spec: ModuleSpec, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        lead = (self.layout.slots + 1,) if self.mixed else ()
        out_f, kw = spec.shape[0], dict(device=weight.device)
        if self.mode == "fold":
            if self.inplace:
                return {"bias": torch.zeros(out_f, dtype=weight.dtype, **kw)} if spec.lora_bias and bias is None else {}
            t = {"weight": weight if quant_format(weight) is not None else  # requantized: a new tensor each refresh
                 torch.empty_like(weight) if spec.groups == 1 else  # a grouped conv folds dense
                 weight.new_empty(weight.shape[0], weight.shape[1] * spec.groups, *weight.shape[2:])}
            if spec.lora_bias:
                t["bias"] = torch.empty(out_f, dtype=weight.dtype, **kw)
            if spec.dora:  # read only by graphs that train the base (see passes.fold)
                t["row_scale"] = torch.empty(out_f, dtype=weight.dtype, **kw)
            return t
        t = {"scale": torch.empty(*lead, self.layout.rank, dtype=spec.dtype, **kw)}
        if not self.mixed:  # lora_B's bias and DoRA's magnitude are trained parameters (see tensors)
            if spec.lora_bias:
                t["bias_scale"] = torch.empty(1, dtype=spec.dtype, **kw)
            if spec.dora:
                t["dora_inv_norm"] = torch.empty(out_f, dtype=weight.dtype, **kw)
                t["dora_off"] = torch.empty(1, dtype=weight.dtype, **kw)
            return t
        if spec.lora_bias:
            t["lora_bias"] = torch.empty(*lead, out_f, dtype=spec.dtype, **kw)
        if spec.dora:
            t["dora_scale"] = torch.empty(*lead, out_f, dtype=weight.dtype, **kw)
            if bias is not None:
                t["dora_bias"] = torch.empty(*lead, out_f, dtype=weight.dtype, **kw)
        return t

    def _refresh_fold(self, d: Derived, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        m = self._multiplier
        groups = self.layout.specs[d.key].groups
        ws = self.adapters.weights(0, d.key) if m else []
        if d.key in self.requantized:  # W' = quantize(dequantize(W) + scale * B A); off: W itself, not W rounded again
            fresh = fold_tensors(ws, d.kind, weight.dequantize(), bias, m, groups)
            d.tensors["weight"] = requantized(fresh["weight"], self.requantize) if ws else weight
        else:
            fresh = fold_tensors(ws, d.kind, weight, bias, m, groups)
            _copy_full(d.tensors["weight"], fresh["weight"])  # tensor parallel: each rank keeps its shard
        if "bias" in d.tensors:  # lora_bias: the merged bias; while off, the base's (or none: zeros)
            new_bias = fresh.get("bias", bias)
            _copy_full(d.tensors["bias"], _full(new_bias)) if new_bias is not None else d.tensors["bias"].zero_()
        if "row_scale" in d.tensors:  # DoRA; while off (or a plain adapter swapped in), W' = W: 1
            _copy_full(d.tensors["row_scale"], fresh["row_scale"]) if "row_scale" in fresh \
                else d.tensors["row_scale"].fill_(1.0)

    def _refresh_branch(self, d: Derived, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        per_slot = [self._slot_coefficients(d, k, weight, bias) for k in range(self.layout.slots)]
        for role, t in d.tensors.items():
            values = [c.get(role) for c in per_slot]
            values = [torch.full_like(t[0] if self.mixed else t, IDENTITY.get(role, 0.0)) if v is None else v
                      for v in values]
            if self.mixed:
                t[0].fill_(IDENTITY.get(role, 0.0))
                for k, v in enumerate(values):
                    t[k + 1].copy_(v)
            else:
                _copy_full(t, values[0])

    def _slot_coefficients(self, d: Derived, k: int, weight: torch.Tensor,
                           bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Branch mode's per-slot values of module ``d.key`` for the adapters of slot ``k``."""
        spec, m, rank = self.layout.specs[d.key], self._multiplier, self.layout.rank
        ab = self.trainable[d.key]
        ws = self.adapters.weights(k, d.key) if m else []
        c = {"scale": rank_scale(ws, rank, m, spec.dtype), "lora_bias": lora_bias(ws, m, spec.shape[0], spec.dtype),
             "bias_scale": torch.tensor([bias_parts(ws, spec.shape[0], spec.dtype)[1] * m], dtype=spec.dtype)}
        if spec.dora and any(w.magnitude is not None for w in ws):
            a, b = (ab["lora_a"][k + 1], ab["lora_b"][k + 1]) if self.mixed else (ab["lora_a"], ab["lora_b"])
            dev = weight.device
            delta = dora_delta(a, b, c["scale"].to(dev), d.kind, ws[0].rank, spec.groups)
            if self.mixed:
                c["dora_scale"], c["dora_bias"] = dora_coefficients(
                    as_out_in(weight, d.kind), bias, delta, ws[0].magnitude.to(dev))
            else:  # the graph multiplies by the trained magnitude
                c["dora_inv_norm"] = dora_coefficients(as_out_in(weight, d.kind), None, delta,
                                                       torch.ones(spec.shape[0], device=dev))[0]
                c["dora_off"] = torch.zeros(1, dtype=weight.dtype, device=dev)
        return c

    def refresh_slot(self, d: Derived, k: int) -> bool:
        """Mixed branch mode: rewrite slot ``k``'s row of ``d``'s per-slot values in place, from
        the adapters as they are now (the other rows, which running calls may read, untouched).
        False where a row alone cannot be made current (DoRA's, computed from the base weight:
        left to the next call's check)."""
        if not (self.mixed and self.mode == "branch") or self.layout.specs[d.key].dora or d.kind == "override":
            return False
        c = self._slot_coefficients(d, k, *d.base)
        with torch.no_grad():
            for role, t in d.tensors.items():
                v = c.get(role)
                t[k + 1].fill_(IDENTITY.get(role, 0.0)) if v is None else t[k + 1].copy_(v)
        return True
