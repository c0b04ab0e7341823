"""The tensors a rewritten graph reads, built from adapters once and refilled in place on swap.

Branch mode, per module (adapters summed into one slot are concatenated along the rank and
padded to the rank budget R):

    lora_a     (R, in)    A's rows; embeddings keep A transposed, (vocab, R), for a lookup
    lora_b     (out, R)   B's columns
    scale      (R,)       each rank slot's scale (0 in padding), times the global multiplier
    lora_bias  (out,)     sum of scale * lora_B.bias            (lora_bias adapters)
    dora_scale (out,)     m / ||W + scale * B A||, per row       (DoRA)
    dora_bias  (out,)     (1 - dora_scale) * b                   (DoRA, base bias present)

Mixed batches stack one slot per named adapter behind slot 0, the base model (all zeros):
every tensor above gains a leading (N + 1) dimension, and embeddings' A is flattened to
((N + 1) * vocab, R) for a single lookup.

Fold mode, per module: ``weight`` = W + sum(scale * B A) (DoRA: dora_scale * that), in the
op's own layout, and ``bias`` when lora_bias changes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from .adapter import Adapter, LoraWeights, as_adapters, combined_modules, combined_overrides
from .errors import ModelMismatchError, SwapError, raise_if

IDENTITY = {"lora_bias": 0.0, "dora_scale": 1.0, "dora_bias": 0.0}  # a role's value when unused
MAX_ROWS = 4096


def branch_tensors(ws: list[LoraWeights], rank: int, kind: str, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, multiplier: float, shape: tuple[int, int],
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Branch-mode tensors of one module and one slot; ``shape`` is (out, in), ``rank`` the budget.

    ``weight`` / ``bias`` are the base op's real tensors in the op's layout (Conv1D: (in, out)).
    """
    out_f, in_f = shape
    device = weight.device if weight is not None else None
    ws = [w.to(device) for w in ws]
    kw = dict(dtype=dtype, device=device)
    a, b = torch.zeros(rank, in_f, **kw), torch.zeros(out_f, rank, **kw)
    scale, lora_bias = torch.zeros(rank, **kw), torch.zeros(out_f, **kw)
    at = 0
    for w in ws:
        a[at:at + w.rank], b[:, at:at + w.rank] = w.lora_a, w.lora_b
        scale[at:at + w.rank] = w.scale * multiplier
        if w.bias is not None:
            lora_bias += w.scale * multiplier * w.bias.to(dtype)
        at += w.rank
    out = {"lora_a": a.T.contiguous() if kind == "embedding" else a, "lora_b": b, "scale": scale}
    if any(w.bias is not None for w in ws):
        out["lora_bias"] = lora_bias
    dora = [w for w in ws if w.magnitude is not None]
    if dora and weight is not None:  # without the base weight (before any graph), A and B only
        assert len(ws) == 1, "DoRA is applied alone (checked by combined_modules)"
        weight_oi = (weight.T if kind == "conv1d" else weight).detach()
        merged = weight_oi.float() + dora[0].scaled(multiplier).delta_weight()
        ds = (dora[0].magnitude.float() / torch.linalg.norm(merged, dim=1)).to(weight_oi.dtype)
        out["dora_scale"] = ds
        if bias is not None:
            out["dora_bias"] = (1 - ds) * bias.detach()
    return out


def fold_tensors(ws: list[LoraWeights], kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                 multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """Fold-mode tensors of one module: the merged weight (op layout) and, if changed, bias."""
    weight = weight.detach()
    ws = [w.to(weight.device) for w in ws]
    w_oi = (weight.T if kind == "conv1d" else weight).float()
    new_bias = None if bias is None else bias.detach().float()
    for w in ws:
        delta = w.delta_weight() * multiplier
        if w.magnitude is not None:
            merged = w_oi + delta
            w_oi = (w.magnitude.float() / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged
        else:
            w_oi = w_oi + delta
        if w.bias is not None:
            extra = w.scale * multiplier * w.bias.float()
            new_bias = extra if new_bias is None else new_bias + extra
    out = {"weight": (w_oi.T if kind == "conv1d" else w_oi).to(weight.dtype).contiguous()}
    if any(w.bias is not None for w in ws):
        out["bias"] = new_bias.to(weight.dtype)
    return out


def _complete(t: dict[str, torch.Tensor], roles: Sequence[str], out_f: int, lora_dtype: torch.dtype,
              out_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Add the roles ``t`` lacks with their identity values (so every slot has the same roles)."""
    for role in roles:
        if role not in t:
            dtype = lora_dtype if role == "lora_bias" else out_dtype
            t[role] = torch.full((out_f,), IDENTITY[role], dtype=dtype, device=t["lora_b"].device)
    return t


class OriginalStore:
    """Exact copies of weights that in-place folding overwrites, kept on disk (not in memory)."""

    def __init__(self):
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="lora_fx_originals_")

    def _path(self, fqn: str) -> str:
        import os

        return os.path.join(self._dir.name, fqn + ".safetensors")

    def save(self, fqn: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        from safetensors.torch import save_file

        tensors = {"weight": weight.detach().cpu().contiguous()}
        if bias is not None:
            tensors["bias"] = bias.detach().cpu().contiguous()
        save_file(tensors, self._path(fqn))

    def restore(self, fqn: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        from safetensors import safe_open

        with safe_open(self._path(fqn), framework="pt") as f:
            weight.copy_(f.get_tensor("weight"))
            if bias is not None:
                bias.copy_(f.get_tensor("bias"))


class LoraState:
    """The adapters being applied and the tensors built from them, shared by every graph.

    ``adapters``: an Adapter or list (summed; one slot), or a mapping name -> Adapter or list
    (mixed batches; one slot per name, selected per row). One module's tensors are built the
    first time a graph shows its op (fold and DoRA need the base weight) and reused by later
    graphs (prefill, decode, recompiles), so refilling them in place reaches every compiled graph.
    """

    def __init__(self, adapters: Adapter | Sequence[Adapter] | Mapping[str, Adapter | Sequence[Adapter]],
                 mode: str, max_rank: int | None = None, inplace: bool = False):
        if mode not in ("branch", "fold"):
            raise ValueError(f"mode: expected 'branch' or 'fold', found {mode!r}")
        if inplace and mode != "fold":
            raise ValueError(f"inplace: expected mode='fold', found mode={mode!r}")
        self.mode = mode
        self.inplace = inplace
        self.originals: OriginalStore | None = OriginalStore() if inplace else None
        self.mixed = isinstance(adapters, Mapping)
        if self.mixed and mode != "branch":
            raise SwapError("mixed-adapter batches: expected mode='branch', found mode='fold' "
                            "(one folded weight cannot hold several adapters)")
        self.names: list[str] = list(adapters) if self.mixed else []
        slots = [as_adapters(a) for a in adapters.values()] if self.mixed else [as_adapters(adapters)]
        self._set_slots(slots)
        needed = self._needed_rank(self.slot_modules)
        if max_rank is not None and max_rank < needed:
            raise SwapError(f"max_rank: expected at least the adapters' largest rank {needed}, found {max_rank}")
        self.rank = max_rank or needed
        self.multiplier, self.enabled = 1.0, True
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        # fqn -> (kind, base weight, base bias, (out, in), lora dtype); the base tensors come with
        # the first graph that shows the module, the rest from the first adapter
        self.base: dict[str, tuple[str, torch.Tensor | None, torch.Tensor | None, tuple[int, int], torch.dtype]] = {}
        self.ready: set[str] = set()
        # fqn -> ((out, in), lora dtype, DoRA, lora_bias): what the graphs are built for, from the first adapters
        self.layout = {fqn: ((ws[0].lora_b.shape[0], ws[0].lora_a.shape[1]), ws[0].lora_a.dtype,
                             any(w.magnitude is not None for w in ws), any(w.bias is not None for w in ws))
                       for fqn, ws in self.modules.items()}
        self.override_tensors: dict[str, torch.Tensor] = {}
        self.override_base: dict[str, torch.Tensor] = {}
        self.index = torch.zeros(MAX_ROWS, dtype=torch.long)  # mixed batches: slot of each selected row
        self.rows = torch.ones((), dtype=torch.long)  # how many rows were selected
        if mode == "branch":  # A and B exist before any graph, so an optimizer can be built first
            for fqn, ws in self.modules.items():
                self._set_base(fqn, "embedding" if ws[0].embedding else "linear", None, None)
                built = self._build(fqn)
                self.tensors[fqn] = {r: torch.nn.Parameter(built[r]) for r in ("lora_a", "lora_b")}

    def _set_base(self, fqn: str, kind: str, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        shape, dtype, _, _ = self.layout[fqn]
        self.base[fqn] = (kind, weight, bias, shape, dtype)

    def _set_slots(self, slots: list[list[Adapter]]) -> None:
        self.slots = slots
        self.slot_modules = [combined_modules(s) for s in slots]
        self.overrides = combined_overrides([a for s in slots for a in s])
        raise_if(["modules_to_save / saved biases: expected none in a mixed-adapter batch, found "
                  f"{sorted(self.overrides)[:4]}"] if self.mixed and self.overrides else [],
                 ModelMismatchError, "cannot serve these adapters in one batch:")
        self.modules: dict[str, list[LoraWeights]] = {}
        for mods in self.slot_modules:
            for fqn, ws in mods.items():
                self.modules.setdefault(fqn, ws)

    @staticmethod
    def _needed_rank(slot_modules: list[dict[str, list[LoraWeights]]]) -> int:
        return max((sum(w.rank for w in ws) for mods in slot_modules for ws in mods.values()), default=0)

    # -- building -------------------------------------------------------------------------------

    def module_tensors(self, fqn: str, kind: str, weight: torch.Tensor | None,
                       bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The tensors of module ``fqn``, completed when a graph first shows its op."""
        if fqn not in self.ready:
            self._set_base(fqn, kind, weight, bias)
            if self.inplace:
                return self._merge_in_place(fqn)
            tensors = self.tensors.setdefault(fqn, {})
            for role, t in self._build(fqn).items():
                if role in tensors:  # A and B keep their Parameter objects, moved to the model's device
                    tensors[role].data = tensors[role].data.to(t.device)
                tensors.setdefault(role, t)
            self.ready.add(fqn)
        return self.tensors[fqn]

    def _merge_in_place(self, fqn: str) -> dict[str, torch.Tensor]:
        """Fold into the model's own weight (and bias); the originals go to disk for an exact restore.

        Returns the tensors the graph still needs: a bias only when lora_bias meets a layer without one.
        """
        _, weight, bias = self.base[fqn][:3]
        self.originals.save(fqn, weight, bias)
        fresh = self._build(fqn)
        with torch.no_grad():
            weight.copy_(fresh["weight"])
            if "bias" in fresh and bias is not None:
                bias.copy_(fresh["bias"])
        self.tensors[fqn] = {"bias": fresh["bias"]} if "bias" in fresh and bias is None else {}
        self.ready.add(fqn)
        return self.tensors[fqn]

    def restore(self) -> None:
        """In-place fold: put the model's own weights back, bit for bit."""
        if self.originals is not None:
            with torch.no_grad():
                for fqn in self.ready:
                    self.originals.restore(fqn, *self.base[fqn][1:3])

    def override(self, path: str, base_value: torch.Tensor) -> torch.Tensor:
        """The tensor that replaces parameter ``path`` (refilled on swap; the base when disabled)."""
        if path not in self.override_tensors:
            self.override_base[path] = base_value
            self.override_tensors[path] = self.overrides[path].to(base_value.device, base_value.dtype).clone()
        return self.override_tensors[path]

    def _build(self, fqn: str, roles: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        kind, weight, bias, shape, dtype = self.base[fqn]
        mult = self.multiplier if self.enabled else 0.0
        on = mult != 0.0  # scale 0 turns the adapter off (DoRA's m/||W|| too, not only B A)
        if self.mode == "fold":
            return fold_tensors(self.slot_modules[0].get(fqn, []) if on else [], kind, weight, bias, mult)
        per_slot = [branch_tensors(mods.get(fqn, []) if on else [], self.rank, kind, weight, bias, mult, shape, dtype)
                    for mods in self.slot_modules]
        roles = roles or sorted({r for t in per_slot for r in t if r in IDENTITY})
        out_dtype = weight.dtype if weight is not None else dtype
        per_slot = [_complete(t, roles, shape[0], dtype, out_dtype) for t in per_slot]
        if not self.mixed:
            return per_slot[0]
        base_slot = {k: torch.zeros_like(v) if k not in IDENTITY else torch.full_like(v, IDENTITY[k])
                     for k, v in per_slot[0].items()}
        stacked = {k: torch.stack([base_slot[k]] + [t[k] for t in per_slot]) for k in per_slot[0]}
        if kind == "embedding":  # ((N + 1) * vocab, R): one lookup with ids offset by slot * vocab
            stacked["lora_a"] = stacked["lora_a"].reshape(-1, stacked["lora_a"].shape[-1])
        return stacked

    def trained_adapters(self) -> list[Adapter]:
        """The slot's adapters with A and B read back from the (trained) branch tensors."""
        if self.mode != "branch" or self.mixed:
            raise SwapError("trained_adapters: expected a branch-mode backend with one adapter set")
        out = []
        offsets = dict.fromkeys(self.tensors, 0)
        for adapter in self.slots[0]:
            mods = {}
            for fqn, w in adapter.modules.items():
                t, at = self.tensors.get(fqn), offsets.get(fqn, 0)
                if t is None:
                    mods[fqn] = w
                    continue
                a = t["lora_a"].T if w.embedding else t["lora_a"]
                mods[fqn] = dataclasses.replace(w, lora_a=a[at:at + w.rank].detach().clone(),
                                                lora_b=t["lora_b"][:, at:at + w.rank].detach().clone())
                offsets[fqn] = at + w.rank
            out.append(dataclasses.replace(adapter, modules=mods))
        return out

    def parameters(self) -> list[torch.nn.Parameter]:
        """Branch mode's trainable A and B tensors, module by module."""
        return [t for ts in self.tensors.values() for t in ts.values() if isinstance(t, torch.nn.Parameter)]

    # -- refilling in place ---------------------------------------------------------------------

    def refill(self) -> None:
        """Recompute every built tensor from the current adapters, scale and switch; copy in place."""
        with torch.no_grad():
            if self.inplace:
                self.restore()
                for fqn in self.ready:
                    _, weight, bias = self.base[fqn][:3]
                    fresh = self._build(fqn)
                    weight.copy_(fresh["weight"])
                    if bias is not None and "bias" in fresh:
                        bias.copy_(fresh["bias"])
                    if "bias" in self.tensors[fqn]:
                        extra = self.tensors[fqn]["bias"]
                        extra.copy_(fresh["bias"]) if "bias" in fresh else extra.zero_()
            for fqn, tensors in self.tensors.items() if not self.inplace else ():
                fresh = self._build(fqn, roles=[r for r in tensors if r in IDENTITY])
                for role, t in tensors.items():
                    t.copy_(fresh[role] if role in fresh else torch.full_like(t, IDENTITY[role]))
            for path, t in self.override_tensors.items():
                src = self.overrides.get(path) if self.enabled else None
                t.copy_(self.override_base[path] if src is None else src)

    def swap(self, adapters: Adapter | Sequence[Adapter] | Mapping[str, Adapter | Sequence[Adapter]]) -> None:
        """Replace the adapters (all slots, or the named slots of a mixed batch) and refill.

        Raises:
            SwapError: listing every module the compiled graphs cannot take without recompiling.
        """
        if self.mixed:
            if not isinstance(adapters, Mapping):
                raise SwapError(f"swap: expected a mapping of slot names {self.names} to adapters, "
                                f"found {type(adapters).__name__}")
            unknown = [n for n in adapters if n not in self.names]
            raise_if([f"{n}: no such slot (slots: {self.names})" for n in unknown], SwapError, "cannot swap:")
            slots = [as_adapters(adapters[n]) if n in adapters else s for n, s in zip(self.names, self.slots)]
        else:
            slots = [as_adapters(adapters)]
        old = (self.slots, self.slot_modules, self.overrides, self.modules)
        self._set_slots(slots)
        problems = self._swap_problems()
        if problems:
            self.slots, self.slot_modules, self.overrides, self.modules = old
            raise SwapError(problems, header="cannot swap without recompiling; compile a new backend instead, or:")
        self.refill()

    def _swap_problems(self) -> list[str]:
        p: list[str] = []
        needed = self._needed_rank(self.slot_modules)
        if needed > self.rank:
            p.append(f"rank {needed}: above the rank budget {self.rank}; pass max_rank={needed} (or more) "
                     "to lora_fx.backend")
        for fqn, ws in self.modules.items():
            if fqn not in self.layout:
                p.append(f"{fqn}: not in the compiled graphs (a superset of the first adapter's modules); "
                         "list it in the adapters the backend was built with")
                continue
            shape, _, dora, lora_bias = self.layout[fqn]
            kind = self.base[fqn][0] if fqn in self.base else ("embedding" if ws[0].embedding else "linear")
            if self.mode == "branch" and any(w.magnitude is not None for w in ws) != dora:
                p.append(f"{fqn}: DoRA and plain LoRA compile differently; expected "
                         f"{'DoRA' if dora else 'plain LoRA'} here")
            if any(w.bias is not None for w in ws) and not lora_bias:
                p.append(f"{fqn}: lora_bias needs a bias the compiled graph lacks; build the backend with it")
            if ws[0].embedding != (kind == "embedding"):
                p.append(f"{fqn}: expected {kind} LoRA tensors, found {'embedding' if ws[0].embedding else 'linear'}")
            for w in ws:
                if (w.lora_b.shape[0], w.lora_a.shape[1]) != shape:
                    found = (w.lora_b.shape[0], w.lora_a.shape[1])
                    p.append(f"{fqn}: expected LoRA for (out, in) = {shape}, found {found}")
        for path in self.overrides:
            if path not in self.override_tensors:
                p.append(f"{path}: the new adapter replaces this tensor, the compiled graphs do not")
        return p

    def place_selection(self, device: torch.device) -> None:
        """Keep the selection tensors on the model's device (before any graph reads them)."""
        if self.index.device != device:
            self.index, self.rows = self.index.to(device), self.rows.to(device)

    def select(self, rows: Sequence[str | None]) -> None:
        """Mixed batches: row i of the next calls uses slot ``rows[i]`` (None: the base model)."""
        if not self.mixed:
            raise SwapError("select: expected a backend built with a mapping name -> adapter, found one adapter set")
        unknown = sorted({r for r in rows if r is not None and r not in self.names})
        problems = [f"{r!r}: no such adapter (known: {self.names}, or None for the base model)" for r in unknown]
        if not 0 < len(rows) <= MAX_ROWS:
            problems.append(f"rows: expected 1 to {MAX_ROWS} names, found {len(rows)}")
        raise_if(problems, SwapError, "cannot select:")
        slot = {name: i + 1 for i, name in enumerate(self.names)}
        self.index[: len(rows)] = torch.tensor([slot.get(r, 0) if r is not None else 0 for r in rows])
        self.rows.fill_(len(rows))

