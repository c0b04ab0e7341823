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

The parts, each in the module named after it: ``Weights`` (A and B: :mod:`lora_fx.training`),
``Derived`` and its ``Builders`` (:mod:`lora_fx.derived`), ``InPlaceFold`` (:mod:`lora_fx.inplace`),
``Distributed`` (attach and tensor-parallel placement: :mod:`lora_fx.distributed`); this module
holds the settings, the per-call check and the updates that tie them together.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from .derived import Builders, Derived, stamp
from .distributed import Distributed, attached_name
from .dropout import LoraDropout
from .errors import AdapterConfigError, SwapError, raise_if
from .experts import mixed_problems
from .inplace import InPlaceFold
from .originals import OriginalStore
from .quantized import quant_format
from .slots import Adapters, AdapterSet, Layout, Selection
from .training import AB, Weights


class LoraState(Distributed, Weights, Builders, InPlaceFold):
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
        if self.mixed:
            raise_if(mixed_problems(self.layout.specs), AdapterConfigError, "cannot serve these adapters in one batch:")
        self.dropout = LoraDropout(self.adapters.slots, [AdapterSet(r).slots for r in reserve])  # see dropout
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
                                  "lora_b": torch.nn.Parameter(b, requires_grad=False),
                                  **{role: torch.nn.Parameter(t, requires_grad=False)  # lora_B's bias, DoRA's m
                                     for role, t in self._initial_extras(fqn).items()}}
        # modules_to_save copies PEFT trains (branch, one adapter set): parameter path -> the copy,
        # which the graph reads in place of the parameter while the adapter is on (see _recompute)
        self.saved: dict[str, torch.nn.Parameter] = {
            path: torch.nn.Parameter(self.adapters.overrides[path].detach().clone(), requires_grad=False)
            for path in sorted(self.layout.copies) if path in self.adapters.overrides
        } if mode == "branch" and not self.mixed else {}

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
        specs = self.layout.specs
        return {fqn: {role: getattr(self.attached[fqn], attached_name(fqn, specs[fqn], role)) for role in own}
                for fqn, own in self._own.items()}

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
            also = tuple(self.trainable[fqn][r] for r in AB) if self.mode == "branch" and spec.dora else ()
            d = Derived(fqn, kind, self._allocate(spec, weight, bias), (weight, bias),
                        watch=self.mode == "fold" or spec.dora, also=also)
            d.owner = self
            self.derived[key] = d
            if not self.inplace:  # in place: merged at the first call, never in the middle of a compile
                self.refresh(d, (weight, bias))
        elif self.inplace and _follow_weight(d, weight):  # the model moved (restore, .to, enable): merged at the call
            d.generation = -1
        if self.mode == "fold":
            return d.tensors, d
        self.place(weight.device)
        ab = self.trainable[fqn]
        if fqn in self.attached:
            for role in ab:
                self.sources[id(ab[role])] = (ab[role], self.attached[fqn], attached_name(fqn, spec, role))
        if self.dropout.compiled and kind not in ("embedding", "param"):
            return {**ab, **d.tensors, "dropout": self.dropout.tensor(weight.device)}, d
        return {**ab, **d.tensors}, d

    def override_tensor(self, path: str, base: torch.Tensor) -> tuple[torch.Tensor, Derived]:
        """The tensor that replaces parameter ``path`` (the model's own value while not applied)."""
        key = (path, base.dtype, base.device)
        d = self.derived.get(key)
        if path in self.saved:  # the graph reads the copy itself: in the parameter's dtype, as PEFT's copy
            self.place(base.device)
            if self.saved[path].dtype != base.dtype:
                self.saved[path].data = self.saved[path].data.to(base.dtype)
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
            if d.kind == "override" and d.key in self.saved and d.key in self.adapters.overrides and self._multiplier:
                d.tensors["value"] = self.saved[d.key]  # the trained copy itself: its gradient reaches it
            elif d.kind == "override":
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
        kind = f"{spec.experts} experts" if spec.experts else kind
        return f"{mode} {kind} r={ranks} {variant}" + (" +bias" if spec.lora_bias else "")


def _follow_weight(d: Derived, weight: torch.Tensor) -> bool:
    """In place, one set serves a module whatever its weight's placement: the lora_bias it holds for
    a module without a bias (lora_fx's zeros, then the merged bias) follows the weight's dtype and
    device. Returns whether it moved."""
    t = d.tensors.get("bias")
    if t is None or (t.dtype, t.device) == (weight.dtype, weight.device):
        return False
    d.tensors["bias"] = torch.zeros(t.shape, dtype=weight.dtype, device=weight.device)
    return True


def resolve(refs: Sequence[Any], args: Sequence[Any]) -> tuple:
    """Base tensors of a derived set for one call: an int is a position in ``args``."""
    return tuple(args[r] if isinstance(r, int) else r for r in refs)
