"""Each call of a compiled graph: whose weights it gets, and the adapter tensors it reads for them.

Dynamo reuses one compiled graph for every module whose forward has the same code when its guards
cannot tell them apart: repeated blocks compiled regionally (``block.compile()``, diffusers'
``compile_repeated_blocks``), FSDP2's per-layer graph breaks in a whole-model compile, a graph
break between modules. Such a graph was rewritten for the modules dynamo first compiled it for
(X); run for another module Y, whose weights arrive as its inputs, it must read Y's adapter
tensors. Each call looks up the owner of every weight the graph reads for a targeted module's
class (the tensor object itself, cached: one identity test per weight once seen) and binds that
module's tensors: Y's A / B and derived set, or a zero update (fold: Y's own weight) for a module
the adapter does not target.

A graph that cannot be bound is an error naming the modules: its weight belongs to no module of
the model, or to two (tied weights), or to a targeted module whose LoRA has another form (shape,
DoRA, lora_bias, dtype), or the graph was compiled for a module the adapter does not target (it
holds no update to bind) or lacks the module's op (a graph break inside the module).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import graph as g
from .collect import owners_of, param_names, split_module_problem
from .errors import GraphRewriteError, raise_if
from .state import Derived, LoraState
from .tensors import IDENTITY, address

Pairs = tuple[tuple[str, str], ...]  # (compiled for, bound to) of the modules a call binds elsewhere


class Owners:
    """Which module of ``model`` a weight tensor is (by identity, cached by the tensor's id)."""

    def __init__(self, model: torch.nn.Module, state: LoraState):
        self.model, self.state = model, state
        self.names = ("weight", *sorted(param_names(state.layout.specs)))
        self.modules = g.named(model.named_modules(remove_duplicate=False))
        self.cache: dict[int, tuple[torch.Tensor, list[str]]] = {}

    def of(self, t: torch.Tensor) -> list[str]:
        hit = self.cache.get(id(t))
        if hit is not None and hit[0] is t and all(self._holds(f, t) for f in hit[1]):
            return hit[1]
        found = [f for f, m in self.modules.items() if any(getattr(m, n, None) is t for n in self.names)]
        if not found:  # the model changed since, or a tensor sharing a module's storage
            self.modules = g.named(self.model.named_modules(remove_duplicate=False))
            found = [f for f, m in self.modules.items() if any(getattr(m, n, None) is t for n in self.names)] or \
                owners_of(self.model, self.names[1:]).get((address(t), tuple(t.shape)), [])
        self.cache[id(t)] = (t, found)
        return found

    def _holds(self, fqn: str, t: torch.Tensor) -> bool:
        m = self.modules.get(fqn)
        return m is not None and any(getattr(m, n, None) is t for n in self.names)


class Binder:
    """The modules one graph was compiled for, and to which a call binds them (see the module doc).

    ``owned``: (call position, the modules the graph was compiled for there, whether it lacks
    their op) for every weight input of a targeted module's class (``collect._owned_weights``).
    """

    def __init__(self, owners: Owners, owned: list[tuple[int, set[str], bool]], args: Sequence[Any]):
        self.owners, self.state = owners, owners.state
        self.items = [[pos, args[pos], want, split, None] for pos, want, split in owned]  # last tensor, last pair

    def pairs(self, args: Sequence[Any]) -> Pairs:
        """(compiled for, bound to) of every module this call runs the graph for in another's place."""
        out = []
        for item in self.items:
            pos, last, want, split, pair = item
            t = args[pos]
            if t is not last:
                pair = self._pair(pos, t, want, split)
                item[1], item[4] = t, pair
            if pair is not None:
                out.append(pair)
        return tuple(out)

    def _pair(self, pos: int, t: torch.Tensor, want: set[str], split: bool) -> tuple[str, str] | None:
        got = set(self.owners.of(t))
        if got & want or not got and not want:
            return None
        specs, on = self.state.layout.specs, bool(self.state._multiplier)
        targeted = sorted((want | got) & set(specs))
        if split:  # compiled for a module split by a graph break: the op is in no graph
            raise_if([split_module_problem(f, f"argument {pos}", self.owners.modules.get(f)) for f in targeted]
                     if on else [], GraphRewriteError, "cannot apply the adapter to this graph:")
            return None
        compiled = sorted(want & set(specs))
        problem = None
        if len(got) != 1:
            problem = f"it belongs to {sorted(got) or 'no module of the model'}"
        elif not compiled:
            if not got & set(specs):
                return None  # untargeted both: the base op is right
            problem = "the graph was compiled for a module the adapter does not target, so it holds no update to bind"
        elif (y := next(iter(got))) in specs and specs[y] != specs[compiled[0]]:
            problem = f"its LoRA has another form ({specs[y]}) than the one compiled ({specs[compiled[0]]})"
        if problem is None:
            return compiled[0], next(iter(got))
        if not on and not compiled:
            return None  # disabled or scale 0: the base output is right
        raise GraphRewriteError(
            [f"argument {pos}: this graph was compiled for {sorted(want)} and dynamo now runs it for "
             f"{sorted(got) or 'a tensor of no module'}, which cannot be bound: {problem}. Dynamo reuses a compiled "
             "graph for every module whose forward has the same code (regional compilation, a graph break between "
             "modules); compile the whole model, or target every repeated block alike"],
            header="cannot apply the adapter to this graph:")


class Table:
    """What one binding of a graph reads: per extra input a derived tensor (``(d, role)``), a fixed
    tensor, or a call argument (fold's zero update reads the module's own weight); the derived
    sets to keep current, and the A / B read from their module at each call (attached)."""

    def __init__(self, state: LoraState, slots: list[tuple], derived: list[tuple[Derived, tuple]],
                 live: dict[int, tuple]):
        self.slots, self.derived, self.live = slots, derived, live
        self.modules = {d.key for d, _ in derived if d.kind != "override"}  # whose outputs a call computes
        self.watched = [(d, refs) for d, refs in derived if d.watch or state.inplace]
        self.args = [(i, s[1]) for i, s in enumerate(slots) if s[0] == "arg"]
        self.seen = [-1, -1]  # the state's generation and changes when ``current`` was built
        self.checked: list = [None, -1]  # the watched stamp, and the state's changes, at the last full check
        self.current: tuple = ()

    def tensors(self, args: Sequence[Any]) -> tuple:
        out = self.current
        if self.args:
            out = list(out)
            for i, pos in self.args:
                out[i] = args[pos]
        if self.live:
            out = tuple(getattr(*self.live[i]) if i in self.live else t for i, t in enumerate(out))
        return tuple(out)

    def rebuild(self) -> None:
        self.current = tuple(s[1].tensors[s[2]] if s[0] == "d" else s[1] if s[0] == "t" else None
                             for s in self.slots)


def base_table(state: LoraState, extra: tuple, derived: list[tuple[Derived, tuple]]) -> Table:
    """The graph as compiled: every extra tensor is the one the rewrite added."""
    owner = {id(t): (d, role) for d, _ in derived for role, t in d.tensors.items()}
    slots = [("d", *owner[id(t)]) if id(t) in owner else ("t", t) for t in extra]
    live = {i: state.sources[id(t)][1:] for i, t in enumerate(extra) if id(t) in state.sources}
    return Table(state, slots, derived, live)


def bound_table(state: LoraState, base: Table, extra: tuple, derived: list[tuple[Derived, tuple]],
                added: dict[str, dict[str, torch.Tensor]], pairs: Pairs, args: Sequence[Any]) -> Table:
    """``base`` with each pair's compiled module X bound to module Y: Y's tensors where X's were
    (``added``: the tensors the rewrite added for each module, by role)."""
    slots, live = list(base.slots), dict(base.live)
    new_derived = []
    by_key = {d.key: (d, refs) for d, refs in derived if d.kind != "override"}
    ab_pos = {id(p): i for i, p in enumerate(extra)}
    for x, y in pairs:
        d_x, refs = by_key[x]
        positions = {role: ab_pos[id(t)] for role, t in added[x].items() if id(t) in ab_pos}
        weight, bias = (args[r] if isinstance(r, int) else r for r in refs)
        if y in state.layout.specs:
            tensors, d_y = state.module_tensors(y, d_x.kind, weight, bias)
            new_derived.append((d_y, refs))
            for role, i in positions.items():
                slots[i] = ("d", d_y, role) if role in d_y.tensors else ("t", tensors[role])
                live.pop(i, None)
                if id(tensors.get(role)) in state.sources:
                    live[i] = state.sources[id(tensors[role])][1:]
            continue
        for role, i in positions.items():  # a module the adapter does not target: a zero update
            live.pop(i, None)
            if state.mode == "fold" and role == "weight":
                slots[i] = ("arg", refs[0])  # the module's own weight
            elif state.mode == "fold":  # lora_bias's merged bias: the module's own, or none
                slots[i] = ("arg", refs[1]) if isinstance(refs[1], int) else ("t", torch.zeros_like(d_x.tensors[role]))
            else:
                slots[i] = ("t", torch.full_like(added[x][role], IDENTITY.get(role, 0.0)))
    bound = {x for x, _ in pairs}
    new_derived += [(d, refs) for d, refs in derived if d.key not in bound]
    return Table(state, slots, new_derived, live)
