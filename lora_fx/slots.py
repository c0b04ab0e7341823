"""Which adapters are applied (``AdapterSet``) and what the graphs are compiled for (``Layout``).

An ``AdapterSet`` is one slot (an adapter, or a list whose updates are summed) or named slots
(mixed-adapter batches). It changes on ``swap``. The ``Layout`` is fixed when a backend is built:
the modules, their shapes and variants, the rank budget and the slot names. Every graph is
rewritten for the whole layout, whatever is active when it is compiled, so a graph compiled after
a swap looks like one compiled first.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .adapter import Adapter, LoraWeights, as_adapters, combined_modules, combined_overrides
from .errors import ModelMismatchError, SwapError, raise_if
from .targets import is_module_copy

Adapters = Adapter | Sequence[Adapter] | Mapping[str, Adapter | Sequence[Adapter]]
MAX_ROWS = 4096


class AdapterSet:
    """The adapters being applied: ``slots[i]`` is a list of adapters summed together.

    Attributes:
        names: slot names of a mixed-batch set (empty for one slot).
        modules: per slot, module fqn -> the LoraWeights summed there.
        overrides: parameter path -> replacement tensor (modules_to_save, saved biases).
    """

    def __init__(self, adapters: Adapters):
        named = isinstance(adapters, Mapping)
        self.names: list[str] = list(adapters) if named else []
        self.slots = [[] if a is None else as_adapters(a) for a in adapters.values()] if named \
            else [as_adapters(adapters)]  # a named slot may be empty (None: the base model)
        self.modules = [combined_modules(s) for s in self.slots]
        self.overrides = combined_overrides([a for s in self.slots for a in s])
        raise_if(["modules_to_save / saved biases: expected none in a mixed-adapter batch, found "
                  f"{sorted(self.overrides)[:4]}"] if named and self.overrides else [],
                 ModelMismatchError, "cannot serve these adapters in one batch:")

    @property
    def mixed(self) -> bool:
        return bool(self.names)

    @property
    def rank(self) -> int:
        """The largest summed rank of any module in any slot."""
        return max((sum(w.rank for w in ws) for mods in self.modules for ws in mods.values()), default=0)

    def weights(self, slot: int, fqn: str) -> list[LoraWeights]:
        return self.modules[slot].get(fqn, [])

    def replace(self, adapters: Adapters) -> AdapterSet:
        """The set after ``swap(adapters)``: all of it, or the named slots of a mixed set (None
        empties a slot: its rows run the base model)."""
        if not self.mixed:
            return AdapterSet(adapters)
        if not isinstance(adapters, Mapping):
            raise SwapError(f"swap: expected a mapping of slot names {self.names} to adapters, "
                            f"found {type(adapters).__name__}")
        unknown = [n for n in adapters if n not in self.names]
        raise_if([f"{n}: no such slot (slots: {self.names})" for n in unknown], SwapError, "cannot swap:")
        return AdapterSet({n: adapters.get(n, s or None) for n, s in zip(self.names, self.slots)})


@dataclass(frozen=True)
class ModuleSpec:
    """What the graphs compute at one module.

    shape: (out, in) of the LoRA update; embeddings (dim, vocab). dtype: the adapter's, which the
    branch computes in. dora / lora_bias: whether the graph has those terms.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    embedding: bool
    dora: bool
    lora_bias: bool
    kernel: tuple[int, ...] = ()  # a conv's kernel size (A is (R, in, *kernel))
    groups: int = 1  # a conv's groups (B is block-diagonal)
    param: str | None = None  # LoRA merged into this parameter of the module (LoraWeights.param)
    experts: int = 0  # a 3-D expert parameter's E (LoraWeights.experts); the fqn is then the parameter's

    @staticmethod
    def of(ws: list[LoraWeights]) -> ModuleSpec:
        w = ws[0]
        return ModuleSpec((w.lora_b.shape[0], w.lora_a.shape[1]), w.lora_a.dtype, w.embedding,
                          any(x.magnitude is not None for x in ws), any(x.bias is not None for x in ws),
                          w.kernel, w.groups, w.param, w.experts)


@dataclass(frozen=True)
class Layout:
    """What every graph is compiled for; fixed for the life of a backend."""

    specs: dict[str, ModuleSpec]
    rank: int
    names: tuple[str, ...]
    overrides: frozenset[str]
    copies: frozenset[str] = frozenset()  # the overrides that are modules_to_save copies (not loaded into the base)

    @staticmethod
    def of(aset: AdapterSet, max_rank: int | None = None, reserve: Sequence[Adapters] = ()) -> Layout:
        """The layout of ``aset``, widened for the ``reserve`` adapter sets a swap may bring later
        (their modules, ranks and variants: adapters with other target sets share the graphs)."""
        later = [AdapterSet(a) for a in reserve]
        needed = max([aset.rank] + [r.rank for r in later])
        if max_rank is not None and max_rank < needed:
            raise SwapError(f"max_rank: expected at least the adapters' largest rank {needed}, found {max_rank}")
        specs: dict[str, ModuleSpec] = {}
        for one in (aset, *later):
            for mods in one.modules:
                for fqn, ws in mods.items():
                    spec = ModuleSpec.of(ws)
                    have = specs.setdefault(fqn, spec)
                    dtypes = {str(have.dtype)} | {str(w.lora_a.dtype) for w in ws}
                    if len(dtypes) > 1:
                        raise SwapError(f"{fqn}: expected the adapters' LoRA tensors in one dtype, found "
                                        f"{sorted(dtypes)}; the graphs compute each module in one dtype. Load "
                                        "them with the same dtype= (load_adapter / init_adapter)")
                    specs[fqn] = dataclasses.replace(have, dora=have.dora or spec.dora,
                                                     lora_bias=have.lora_bias or spec.lora_bias)
        overrides = frozenset(aset.overrides).union(*(r.overrides for r in later))
        copies = frozenset(path for one in (aset, *later) for slot in one.slots for a in slot
                           for path in a.overrides if is_module_copy(a.config, path))
        return Layout(specs, max_rank or needed, tuple(aset.names), overrides, copies)

    @property
    def slots(self) -> int:
        return max(1, len(self.names))

    def problems(self, aset: AdapterSet, mode: str) -> list[str]:
        """Every way ``aset`` does not fit the compiled graphs (empty when it fits)."""
        p: list[str] = []
        if aset.rank > self.rank:
            p.append(f"rank {aset.rank}: above the rank budget {self.rank}; pass max_rank={aset.rank} (or more) "
                     "to lora_fx.backend")
        for mods in aset.modules:
            for fqn, ws in mods.items():
                spec = self.specs.get(fqn)
                if spec is None:
                    p.append(f"{fqn}: not in the compiled graphs (built for the first adapter's modules); "
                             "pass this adapter in lora_fx.backend(..., reserve=[...]) to compile for it too")
                    continue
                new = ModuleSpec.of(ws)
                if mode == "branch" and new.dora and not spec.dora:
                    p.append(f"{fqn}: DoRA needs terms the compiled graph lacks (it was built for plain LoRA here); "
                             "build the backend with it (or in reserve=)")
                if new.lora_bias and not spec.lora_bias:
                    p.append(f"{fqn}: lora_bias needs a bias the compiled graph lacks; build the backend with it")
                if new.embedding != spec.embedding:
                    want, got = ("embedding", "linear") if spec.embedding else ("linear", "embedding")
                    p.append(f"{fqn}: expected {want} LoRA tensors, found {got}")
                if new.param != spec.param:
                    p.append(f"{fqn}: expected LoRA on {spec.param or 'the module output'}, found it on "
                             f"{new.param or 'the module output'}")
                if new.dtype != spec.dtype:
                    p.append(f"{fqn}: expected LoRA tensors in {spec.dtype} (the compiled graphs compute in it), found "
                             f"{new.dtype}; load the adapter with dtype={spec.dtype}")
                if (new.shape, new.kernel, new.groups) != (spec.shape, spec.kernel, spec.groups):
                    p.append(f"{fqn}: expected LoRA for (out, in) = {spec.shape}, kernel {spec.kernel}, groups "
                             f"{spec.groups}; found {new.shape}, kernel {new.kernel}, groups {new.groups}")
                if new.experts != spec.experts:
                    p.append(f"{fqn}: expected LoRA for {spec.experts or 'no'} experts (the compiled graphs hold A / B "
                             f"per expert), found {new.experts or 'none'}")
        p += [f"{path}: the new adapter replaces this tensor, the compiled graphs do not"
              for path in sorted(set(aset.overrides) - self.overrides)]
        return p


class Selection:
    """Mixed batches: the slot of each row the compiled graphs read (``index``, ``rows``).

    A selection is a tuple of slot numbers (0: the base model) and a beam count: a call's batch
    must hold exactly ``len(rows) * beams`` rows (each row repeated for its beams, as PEFT's
    ``adapter_names`` with ``num_beams``). ``select`` sets the selection every thread reads;
    ``push`` / ``pop`` set one for the calling thread alone (a pool's ``using`` block), held in
    the thread's own ``index`` / ``rows`` that its calls read instead (``apply``); a call under a
    ``select`` writes the shared ones and runs under the state lock. A call never reads another
    thread's rows.
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.index = torch.zeros(MAX_ROWS, dtype=torch.long)
        self.rows = torch.ones((), dtype=torch.long)
        self.default: tuple[tuple[int, ...], int] | None = None  # None: every row runs the base model
        self.written: tuple[tuple[int, ...], int] | None = None  # what index / rows hold
        self.local = threading.local()

    def slots_of(self, rows: Sequence[str | None], beams: int = 1) -> tuple[int, ...]:
        """The slot number of each named row (raises on unknown names / counts)."""
        unknown = sorted({r for r in rows if r is not None and r not in self.names})
        problems = [f"{r!r}: no such adapter (known: {self.names}, or None for the base model)" for r in unknown]
        if not 0 < len(rows) <= MAX_ROWS:
            problems.append(f"rows: expected 1 to {MAX_ROWS} names, found {len(rows)}")
        if not isinstance(beams, int) or isinstance(beams, bool) or beams < 1:
            problems.append(f"beams: expected an int >= 1, found {beams!r}")
        raise_if(problems, SwapError, "cannot select:")
        slot = {name: i + 1 for i, name in enumerate(self.names)}
        return tuple(slot[r] if r is not None else 0 for r in rows)

    def select(self, rows: Sequence[str | None], beams: int = 1) -> None:
        self.default = (self.slots_of(rows, beams), beams)

    def push(self, slots: tuple[int, ...], beams: int) -> None:
        self.local.__dict__.setdefault("stack", []).append((slots, beams))

    def pop(self) -> None:
        self.local.stack.pop()

    def current(self) -> tuple[tuple[int, ...], int] | None:
        stack = getattr(self.local, "stack", None)
        return stack[-1] if stack else self.default

    def all_base(self) -> bool:
        """Whether the calling thread's rows all run the base model."""
        cur = self.current()
        return cur is None or not any(cur[0])

    def apply(self, batch: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Before a call of ``batch`` rows (None: not known): check it against the calling thread's
        selection. Inside a block (``push``) return the thread's own ``(index, rows)`` holding it,
        which the call reads in place of the shared ones (so it may run while other threads call
        or fill slots its block does not hold); otherwise write the selection into the shared
        ``index`` / ``rows`` (hold the state lock while the call runs) and return None."""
        cur = self.current()
        if cur is not None and batch is not None and batch != len(cur[0]) * cur[1]:
            n, k = len(cur[0]), cur[1]
            raise SwapError(f"mixed batch: expected {n * k} rows ({n} selected" + (f" x {k} beams" if k > 1 else "")
                            + f"), found a batch of {batch}; select one name per row of this batch, or declare "
                            "beams (select(rows, beams=k) / using(rows, beams=k)) when the model repeats each row")
        if getattr(self.local, "stack", None):
            own = getattr(self.local, "own", None)
            if own is None or own[0].device != self.index.device:
                own = self.local.own = [torch.zeros_like(self.index), torch.ones_like(self.rows), None]
            if own[2] != cur:
                _write(own[0], own[1], cur)
                own[2] = cur
            return own[0], own[1]
        if cur != self.written:
            _write(self.index, self.rows, cur)
            self.written = cur
        return None

    def to(self, device: torch.device) -> None:
        self.index, self.rows = self.index.to(device), self.rows.to(device)


def _write(index: torch.Tensor, rows: torch.Tensor, selection: tuple[tuple[int, ...], int] | None) -> None:
    slots = selection[0] if selection is not None else (0,)
    index[: len(slots)] = torch.tensor(slots)
    rows.fill_(len(slots))
