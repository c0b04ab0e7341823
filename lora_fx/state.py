"""The tensors rewritten graphs read, and when they are recomputed.

Three kinds of tensor, each with one source of truth:

- ``lora_a`` / ``lora_b`` (branch mode): ``nn.Parameter``s made from the adapters when the backend
  is built. After that they *are* the adapter: training writes them, ``swap`` writes them, nothing
  else does (``set_scale`` / ``disable`` never touch them).
- derived tensors (``Derived``): scale, lora_bias, DoRA's coefficients, fold's W', substituted
  parameters. Each is computed from the adapters, the settings (multiplier, on/off), the base
  weight and, for DoRA, the current A / B; one set per module and placement (dtype, device) of
  the base weight. A derived set remembers the settings generation and the base tensors' version
  counters it was computed from; before each call the compiled graph recomputes it in place if
  either moved (a swap, a weight edited in place, ``load_state_dict``, an optimizer step).
- in-place fold: the model's own weight holds W'; the originals are on disk. A change lora_fx did
  not make to a merged weight is an error (it cannot tell a new base from the merged one).

Every change of settings and every compiled call holds ``lock``, so no call sees half a swap.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import torch

from .adapter import Adapter, LoraWeights, regrouped
from .errors import AdapterConfigError, StaleWeightError, SwapError, raise_if
from .inplace import record_merge
from .originals import OriginalStore
from .quantized import quant_format, requantized
from .slots import Adapters, AdapterSet, Layout, ModuleSpec, Selection
from .tensors import (
    IDENTITY,
    address,
    as_out_in,
    dora_coefficients,
    dora_delta,
    fold_tensors,
    lora_bias,
    padded_ab,
    rank_scale,
)

ATTACHED = {"lora_a": "lora_fx_A", "lora_b": "lora_fx_B"}  # A / B's names on their modules once attached


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; a collective for a DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole tensor ``full`` into ``param``, each rank its own shard when it is a DTensor."""
    with torch.no_grad():
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            # every rank holds the same full tensor: each takes its shard without communicating
            param.copy_(distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                          src_data_rank=None))
        else:
            param.copy_(full)


def _lora_placements(fqn: str, weight: torch.Tensor, spec: ModuleSpec) -> tuple[tuple, tuple]:
    """A's and B's placements for a tensor-parallel base weight (see ``LoraState._settle``)."""
    from torch.distributed.tensor import Replicate, Shard

    from .errors import GraphRewriteError

    rep = tuple(Replicate() for _ in weight.placements)
    if spec.embedding or spec.kernel or len(weight.placements) != 1:
        what = "an embedding" if spec.embedding else "a conv" if spec.kernel else "a multi-dimensional mesh"
        raise GraphRewriteError(f"{fqn}: tensor parallel over {what} is not supported; expected a Linear with "
                                "ColwiseParallel or RowwiseParallel")
    pl = weight.placements[0]
    if pl == Shard(0):
        return rep, (Shard(0),)
    if pl == Shard(1):
        return (Shard(1),), rep
    if pl == Replicate():
        return rep, rep
    raise GraphRewriteError(f"{fqn}: its weight is laid out as {weight.placements}; expected Shard(0) (colwise), "
                            "Shard(1) (rowwise) or Replicate() for the adapter to follow")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "to_local") else t


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
        self._merged = value
        record_merge(self.base, self.owner, self.key, value)


class LoraState:
    """The adapters applied, the settings, and every tensor the compiled graphs read.

    Args:
        adapters: an Adapter or list (summed; one slot), or a mapping name -> Adapter or list
            (mixed batches; one slot per name, slot 0 the base model).
        mode: "branch" or "fold". max_rank: branch mode's rank budget. inplace: fold into the
            model's own weights. reserve: adapter sets a later swap may bring (see ``Layout.of``).
    """

    def __init__(self, adapters: Adapters, mode: str, max_rank: int | None = None, inplace: bool = False,
                 reserve: Sequence[Adapters] = (), requantize: Any = None):
        if mode not in ("branch", "fold"):
            raise ValueError(f"mode: expected 'branch' or 'fold', found {mode!r}")
        if inplace and mode != "fold":
            raise ValueError(f"inplace: expected mode='fold', found mode={mode!r}")
        if requantize is not None and (mode != "fold" or inplace):
            raise ValueError(f"requantize: expected mode='fold' without inplace, found mode={mode!r}, "
                             f"inplace={inplace} (branch mode keeps the quantized weight as it is)")
        self.mode, self.inplace, self.requantize = mode, inplace, requantize
        self.requantized: set[str] = set()  # fold: modules whose W' is quantized again (see requantize)
        self.adapters = AdapterSet(adapters)
        if self.adapters.mixed and mode != "branch":
            raise SwapError("mixed-adapter batches: expected mode='branch', found mode='fold' "
                            "(one folded weight cannot hold several adapters)")
        self.layout = Layout.of(self.adapters, max_rank, reserve)
        self.multiplier, self.enabled = 1.0, True
        self.generation = 0  # settings and adapters: bumped by every update
        self.changes = 0  # bumped whenever a derived set gets new tensors
        self.lock = threading.RLock()
        self.selection = Selection(self.adapters.names) if self.adapters.mixed else None
        self.derived: dict[tuple, Derived] = {}
        self.originals = OriginalStore() if inplace else None
        self.device: torch.device | None = None  # where A / B (and the selection) live
        # branch: A and B exist before any graph, so an optimizer can be built first
        self._own: dict[str, dict[str, torch.nn.Parameter]] = {}
        self.attached: dict[str, torch.nn.Module] = {}  # see attach()
        # a graph's A / B -> (that tensor, kept so its id stays its own; the module and attribute a call reads)
        self.sources: dict[int, tuple[torch.Tensor, torch.nn.Module, str]] = {}
        if mode == "branch":
            for fqn in self.layout.specs:
                a, b = self._initial_ab(fqn, range(self.layout.slots))
                self._own[fqn] = {"lora_a": torch.nn.Parameter(a, requires_grad=False),
                                  "lora_b": torch.nn.Parameter(b, requires_grad=False)}

    @property
    def mixed(self) -> bool:
        return self.adapters.mixed

    @property
    def trainable(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """Module fqn -> its A and B as they are now: lora_fx's own parameters, or once attached,
        the module's (a distributed wrapper may have replaced them with sharded ones)."""
        if not self.attached:
            return self._own
        self._settle()
        return {fqn: {role: getattr(self.attached[fqn], attr) for role, attr in ATTACHED.items()}
                for fqn in self._own}

    def _settle(self) -> None:
        """Tensor parallel: once ``parallelize_module`` sharded a module's weight, lay its A and B
        out as the op needs them (colwise weight Shard(0): A replicated, B Shard(0); rowwise
        Shard(1): A Shard(1), B replicated), so DTensor computes the branch on each rank's shard
        and reduces it with the base's partial output. FSDP2's shards are left to FSDP2."""
        if self._fsdp:
            return
        checked = False
        for fqn, mod in self.attached.items():
            w = getattr(mod, "weight", None)
            if not hasattr(w, "device_mesh"):
                continue
            if not checked:  # a sharded weight: FSDP2's (left alone from now on) or tensor parallel's
                if any(type(m).__name__.startswith("FSDP") for m in self._model.modules()):
                    self._fsdp = True
                    return
                checked = True
            for attr, placements in zip(ATTACHED.values(), _lora_placements(fqn, w, self.layout.specs[fqn])):
                p = getattr(mod, attr)
                if getattr(p, "placements", None) == placements and getattr(p, "device_mesh", None) == w.device_mesh:
                    continue
                from torch.distributed.tensor import distribute_tensor

                new = distribute_tensor(_full(p).detach(), w.device_mesh, placements, src_data_rank=None)
                mod.register_parameter(attr, torch.nn.Parameter(new, requires_grad=p.requires_grad))

    def attach(self, model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> None:
        """Register A and B as parameters of their modules (``lora_fx_A`` / ``lora_fx_B``), so the
        model's own machinery manages them: FSDP2 shards them and reduces their gradients, the
        optimizer sees the sharded parameters, and each compiled call reads the module's current
        (unsharded) tensors. Must come before the model is wrapped.

        Raises:
            GraphRewriteError: fold mode or mixed batches; DoRA or a grouped conv (their
                derived tensors need the full A / B on every rank); a module already sharded.
        """
        from .errors import GraphRewriteError

        problems = []
        if self.mode != "branch" or self.mixed:
            problems.append("attach: expected a branch-mode backend with one adapter set (fold mode has nothing to "
                            "train; its W' follows the base weight wherever it lives)")
        for fqn in self._own:
            spec, mod = self.layout.specs[fqn], modules.get(fqn)
            if mod is None:
                problems.append(f"{fqn}: the model has no such module")
                continue
            if spec.dora or spec.groups > 1:
                problems.append(f"{fqn}: {'DoRA' if spec.dora else 'a grouped conv'} cannot be attached (its "
                                "derived tensors need the full A and B on every rank)")
            if any(type(t).__name__ == "DTensor" for t in mod.parameters(recurse=False)) or \
                    type(model).__name__.startswith("FSDP"):
                problems.append(f"{fqn}: its module is already sharded (FSDP2 / tensor parallel); call "
                                "be.attach(model) before fully_shard / parallelize_module")
        raise_if(problems, GraphRewriteError, "cannot attach the adapter to this model:")
        self._model, self._fsdp = model, False
        for fqn, t in self._own.items():
            mod = modules[fqn]
            for role, attr in ATTACHED.items():
                if getattr(mod, attr, None) is not t[role]:
                    mod.register_parameter(attr, t[role])
            self.attached[fqn] = mod

    # -- A and B ------------------------------------------------------------------------------

    def _initial_ab(self, fqn: str, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of ``slots`` as the adapters hold them (stacked behind a zero slot when mixed)."""
        spec, rank = self.layout.specs[fqn], self.layout.rank
        pairs = [padded_ab(self.adapters.weights(k, fqn), rank, spec.shape, spec.kernel, spec.dtype, spec.embedding)
                 for k in slots]
        if not self.mixed:
            return pairs[0]
        zero = tuple(torch.zeros_like(t) for t in pairs[0])
        a, b = (torch.stack([zero[i]] + [p[i] for p in pairs]) for i in (0, 1))
        return (a.reshape(-1, rank) if spec.embedding else a), b  # embeddings: ((N + 1) * vocab, R)

    def _write_ab(self, slots: Sequence[int]) -> None:
        """Copy the adapters' A and B of ``slots`` into the parameters (a swap; never a settings change)."""
        for fqn, t in self.trainable.items():
            a, b = self._initial_ab(fqn, slots if self.mixed else [0])
            if not self.mixed:
                _copy_full(t["lora_a"], a)
                _copy_full(t["lora_b"], b)
                continue
            spec = self.layout.specs[fqn]
            for i, k in enumerate(slots):
                if spec.embedding:
                    vocab = spec.shape[1]
                    t["lora_a"][(k + 1) * vocab:(k + 2) * vocab].copy_(a[(i + 1) * vocab:(i + 2) * vocab])
                else:
                    t["lora_a"][k + 1].copy_(a[i + 1])
                t["lora_b"][k + 1].copy_(b[i + 1])

    def place(self, device: torch.device) -> None:
        """Keep A, B and the selection on the model's device (the parameters stay the same objects)."""
        if self.device == device:
            return
        with torch.inference_mode(False):  # never inference tensors (see refresh)
            self._place(device)

    def _place(self, device: torch.device) -> None:
        for t in ({} if self.attached else self._own).values():  # attached: the model moves them
            for p in t.values():
                p.data = p.data.to(device)
        if self.selection is not None:
            self.selection.to(device)
        self.device = device

    def parameters(self) -> list[torch.nn.Parameter]:
        """Branch mode's A and B, module by module; asking for them turns their gradients on.

        A grouped conv's B is held dense (block-diagonal); its gradient is masked to the blocks, so
        training keeps it grouped, as PEFT's grouped lora_B is."""
        refused = [f"{a.name or 'adapter'}: {a.config.inference_only}" for slot in self.adapters.slots for a in slot
                   if a.config.inference_only]
        raise_if(refused, AdapterConfigError, "cannot train these adapters: their eval forward is LoRA, their "
                 "training is not; lora_fx applies them for inference only:")
        params = [p for t in self.trainable.values() for p in t.values()]
        for p in params:
            p.requires_grad_(True)
        for fqn, t in self.trainable.items():
            b = t["lora_b"]
            if self.layout.specs[fqn].groups > 1 and not getattr(b, "_lora_fx_masked", False):
                b.register_hook(lambda grad, fqn=fqn: grad * self._b_blocks(fqn).to(grad))
                b._lora_fx_masked = True
        return params

    def _b_blocks(self, fqn: str) -> torch.Tensor:
        """1 where a grouped conv's dense B may be non-zero (the blocks of the slot's adapters), else 0."""
        ws = [dataclasses.replace(w, lora_b=torch.ones_like(w.lora_b)) for w in self.adapters.weights(0, fqn)]
        spec = self.layout.specs[fqn]
        return padded_ab(ws, self.layout.rank, spec.shape, spec.kernel, spec.dtype, spec.embedding)[1]

    def held(self) -> list[torch.Tensor]:
        """Every tensor lora_fx holds besides the model's own (A / B and the derived tensors)."""
        return [p for t in self.trainable.values() for p in t.values()] + [
            t for d in self.derived.values() for t in d.tensors.values()]

    def trained_adapters(self) -> list[Adapter]:
        """The slot's adapters with A and B read back from the (trained) parameters."""
        if self.mode != "branch" or self.mixed:
            raise SwapError("trained_adapter: expected a branch-mode backend with one adapter set")
        out, offsets = [], dict.fromkeys(self.trainable, 0)
        for adapter in self.adapters.slots[0]:
            mods = {}
            for fqn, w in adapter.modules.items():
                t, at = self.trainable[fqn], offsets[fqn]
                full_a, full_b = _full(t["lora_a"]), _full(t["lora_b"])
                a = full_a.T if w.embedding else full_a
                b = regrouped(full_b[:, at:at + w.rank], w.groups)
                mods[fqn] = dataclasses.replace(w, lora_a=a[at:at + w.rank].detach().cpu().clone(),
                                                lora_b=b.detach().cpu().clone())
                offsets[fqn] = at + w.rank
            out.append(dataclasses.replace(adapter, modules=mods))
        return out

    def live_weights(self, fqn: str, module: torch.nn.Module) -> list[LoraWeights]:
        """The LoRA of module ``fqn`` as the compiled graphs apply it now, for an eager call of
        ``module`` (see :mod:`lora_fx.eager`): each summed adapter's weights with the current A / B
        (branch mode: trained, differentiable), scales times the multiplier, on the module's device."""
        device = next((t.device for t in module.parameters(recurse=False)), None)
        ws = [w.to(device) for w in self.adapters.weights(0, fqn)]
        if self.mode == "branch":
            t, at, live = self.trainable[fqn], 0, []
            for w in ws:
                a = t["lora_a"].T if w.embedding else t["lora_a"]
                live.append(dataclasses.replace(w, lora_a=a[at:at + w.rank].to(device),
                                                lora_b=regrouped(t["lora_b"][:, at:at + w.rank], w.groups).to(device)))
                at += w.rank
            ws = live
        return [w.scaled(self._multiplier) for w in ws]

    # -- derived tensors ------------------------------------------------------------------------

    def module_tensors(self, fqn: str, kind: str, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], Derived]:
        """The tensors a graph's op of module ``fqn`` reads (with ``weight`` / ``bias`` as its base)."""
        spec = self.layout.specs[fqn]
        key = (fqn,) if self.inplace else (fqn, weight.dtype, weight.device)
        d = self.derived.get(key)
        if d is None:
            if self.mode == "fold" and not self.inplace and quant_format(weight) is not None:
                self.requantized.add(fqn)  # the rewrite refused it unless requantize was given
            also = tuple(self.trainable[fqn].values()) if self.mode == "branch" and spec.dora else ()
            d = Derived(fqn, kind, self._allocate(spec, weight, bias), (weight, bias),
                        watch=self.mode == "fold" or spec.dora, also=also)
            d.owner = self
            self.derived[key] = d
            if not self.inplace:  # in place: merged at the first call, never in the middle of a compile
                self.refresh(d, (weight, bias))
        if self.mode == "fold":
            return d.tensors, d
        self.place(weight.device)
        ab = self.trainable[fqn]
        if fqn in self.attached:
            for role, attr in ATTACHED.items():
                self.sources[id(ab[role])] = (ab[role], self.attached[fqn], attr)
        return {**ab, **d.tensors}, d

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
            return t
        t = {"scale": torch.empty(*lead, self.layout.rank, dtype=spec.dtype, **kw)}
        if spec.lora_bias:
            t["lora_bias"] = torch.empty(*lead, out_f, dtype=spec.dtype, **kw)
        if spec.dora:
            t["dora_scale"] = torch.empty(*lead, out_f, dtype=weight.dtype, **kw)
            if bias is not None:
                t["dora_bias"] = torch.empty(*lead, out_f, dtype=weight.dtype, **kw)
        return t

    def override_tensor(self, path: str, base: torch.Tensor) -> tuple[torch.Tensor, Derived]:
        """The tensor that replaces parameter ``path`` (the model's own value while not applied)."""
        key = (path, base.dtype, base.device)
        d = self.derived.get(key)
        if d is None:
            d = self.derived[key] = Derived(path, "override", {"value": torch.empty_like(base)}, (base,), watch=True)
            self.refresh(d, (base,))
        return d.tensors["value"], d

    @property
    def _multiplier(self) -> float:
        return self.multiplier if self.enabled else 0.0

    def refresh(self, d: Derived, base: tuple) -> None:
        """Recompute ``d`` from the settings and ``base`` (the tensors the current call reads).

        The values go into new tensors: a graph run earlier may have saved the old ones for its
        backward (a reference pass under ``disabled()`` between a forward and its backward).
        They are never inference tensors, whatever mode the call that recomputes them runs in (an
        evaluation under ``torch.inference_mode`` between training steps)."""
        with torch.inference_mode(False):
            self._recompute(d, base)

    def _recompute(self, d: Derived, base: tuple) -> None:
        # in place, a substituted tensor keeps its identity: a module's in-place fold may be merged into
        # it (PEFT saves a targeted embedding's base weight with the adapter) and refreshed after it
        keep = (d.kind == "override" and self.inplace, d.key in self.requantized)
        d.tensors = {role: t if keep[0] or (role == "weight" and keep[1]) else torch.empty_like(t)
                     for role, t in d.tensors.items()}
        self.changes += 1
        with torch.no_grad():
            if d.kind == "override":
                src = self.adapters.overrides.get(d.key) if self._multiplier else None
                d.tensors["value"].copy_(base[0] if src is None else src)
            elif self.inplace:
                self._refresh_in_place(d)
            elif self.mode == "fold":
                self._refresh_fold(d, *base)
            else:
                self._refresh_branch(d, *base)
        d.generation = self.generation
        d.stamp = stamp(d.base if self.inplace else (*base, *d.also))

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

    def _refresh_branch(self, d: Derived, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        spec, m, rank = self.layout.specs[d.key], self._multiplier, self.layout.rank
        ab = self.trainable[d.key]
        per_slot = []
        for k in range(self.layout.slots):
            ws = self.adapters.weights(k, d.key) if m else []
            c = {"scale": rank_scale(ws, rank, m, spec.dtype), "lora_bias": lora_bias(ws, m, spec.shape[0], spec.dtype)}
            if spec.dora and any(w.magnitude is not None for w in ws):
                a, b = (ab["lora_a"][k + 1], ab["lora_b"][k + 1]) if self.mixed else (ab["lora_a"], ab["lora_b"])
                dev = weight.device
                delta = dora_delta(a, b, c["scale"].to(dev), d.kind, ws[0].rank, spec.groups)
                c["dora_scale"], c["dora_bias"] = dora_coefficients(
                    as_out_in(weight, d.kind), bias, delta, ws[0].magnitude.to(dev))
            per_slot.append(c)
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

    def _refresh_in_place(self, d: Derived) -> None:
        weight, bias = d.base
        # the model's tensors are saved and put back; a substituted tensor (lora_fx's own: a saved bias
        # or embedding) is recomputed by its own set first, before this one merges into it
        owned = {id(t) for o in self.derived.values() if o.kind == "override" for t in o.tensors.values()}
        model_own = [None if t is None or id(t) in owned else t for t in d.base]
        if d.merged:
            self.originals.restore(d.key, model_own)
            d.merged = False
            d.saved = stamp(model_own)
        m = self._multiplier
        ws = self.adapters.weights(0, d.key) if m else []
        if "bias" in d.tensors:
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

    def check(self, sets: Sequence[tuple[Derived, tuple]]) -> None:
        """Before a call: recompute each derived set whose settings or base (the tensors the call
        reads for it) moved since it was computed."""
        if self.inplace:
            self._check_in_place([d for d, _ in sets], [base for _, base in sets])
            for d, _ in sets:
                d.seen = True  # the call reads d.base (a replaced tensor was taken as the base above)
        for d, base in sets:
            if d.generation != self.generation or (
                    not self.inplace and d.watch and stamp((*base, *d.also)) != d.stamp):
                self.refresh(d, base)

    def rebase(self) -> None:
        """Take the base weights as they are now (written where version counters do not see, e.g.
        through ``.data``): every derived set is recomputed before the next call; in place, a
        weight that no longer holds lora_fx's merge is the new base and is merged again."""
        if self.inplace:
            for d in self.derived.values():
                if d.merged and not self._holds_merge(d):
                    d.merged, d.saved = False, None  # the written values are the new originals
        self.generation += 1
        if self.inplace:
            for d in self.derived.values():
                self.refresh(d, d.base)

    def _holds_merge(self, d: Derived) -> bool:
        """Whether ``d``'s weights still hold exactly the merge lora_fx wrote."""
        owned = {id(t) for o in self.derived.values() if o.kind == "override" for t in o.tensors.values()}
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

    # -- settings -------------------------------------------------------------------------------

    def update(self, *, adapters: Adapters | None = None, multiplier: float | None = None,
               enabled: bool | None = None, restoring: bool = False) -> None:
        """Change the adapters (a swap: A / B are overwritten) and / or the settings.

        Derived tensors are recomputed before the next call reads them; in-place folds are
        applied to the model's weights now.

        Raises:
            SwapError: listing every module the compiled graphs cannot take without recompiling.
            StaleWeightError: an in-place merged weight was changed by someone else (not on restore).
        """
        new = None
        if adapters is not None:
            new = self.adapters.replace(adapters)
            raise_if(self.layout.problems(new, self.mode), SwapError,
                     "cannot swap without recompiling; compile a new backend instead, or:")
        if self.inplace and not restoring:
            self._check_in_place(list(self.derived.values()))
        if new is not None:
            self.adapters = new
            with torch.no_grad():
                self._write_ab([self.layout.names.index(n) for n in adapters] if self.mixed else [0])
        if multiplier is not None:
            self.multiplier = float(multiplier)
        if enabled is not None:
            self.enabled = enabled
        self.generation += 1
        if self.inplace:
            for d in self.derived.values():
                if restoring or d.seen:  # after a restore the merge waits for a call: the model may hold new tensors
                    self.refresh(d, d.base)
                if restoring:
                    d.seen = False

    def describe(self, fqn: str, kind: str) -> str:
        spec = self.layout.specs[fqn]
        ws = next(filter(None, (self.adapters.weights(k, fqn) for k in range(self.layout.slots))), [])
        rslora = any(a.config.use_rslora for slot in self.adapters.slots for a in slot if fqn in a.modules)
        variant = "DoRA" if spec.dora else "rsLoRA" if rslora else "LoRA"
        ranks = "+".join(str(w.rank) for w in ws) or "0"
        mode = "mixed-batch branch" if self.mixed else self.mode
        return f"{mode} {kind} r={ranks} {variant}" + (" +bias" if spec.lora_bias else "")


def resolve(refs: Sequence[Any], args: Sequence[Any]) -> tuple:
    """Base tensors of a derived set for one call: an int is a position in ``args``."""
    return tuple(args[r] if isinstance(r, int) else r for r in refs)
