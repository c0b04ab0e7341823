"""The tensors a rewritten graph reads, built from adapters once and refilled in place on swap.

Branch mode, per module (several adapters are concatenated along the rank, padded to a budget R):

    lora_a     (R, in)    A's rows; embeddings keep A transposed, (vocab, R), for a lookup
    lora_b     (out, R)   B's columns
    scale      (R,)       each rank slot's scale (0 in padding), times the global multiplier
    lora_bias  (out,)     sum of scale * lora_B.bias            (lora_bias adapters)
    dora_scale (out,)     m / ||W + scale * B A||, per row       (DoRA)
    dora_bias  (out,)     (1 - dora_scale) * b                   (DoRA, base bias present)

Fold mode, per module: ``weight`` = W + sum(scale * B A) (DoRA: dora_scale * that), in the
op's own layout, and ``bias`` when lora_bias changes it.
"""

from __future__ import annotations

import torch

from .adapter import Adapter, LoraWeights
from .errors import SwapError

BRANCH_ROLES = ("lora_a", "lora_b", "scale", "lora_bias", "dora_scale", "dora_bias")


def _dora_scale(w: LoraWeights, weight_oi: torch.Tensor) -> torch.Tensor:
    merged = weight_oi.float() + w.delta_weight()
    return (w.magnitude.float() / torch.linalg.norm(merged, dim=1)).to(weight_oi.dtype)


def branch_tensors(ws: list[LoraWeights], rank: int, kind: str, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """Branch-mode tensors of one module (see the module docstring); ``rank`` is the budget R.

    ``weight`` / ``bias`` are the base op's real tensors, in the op's layout (Conv1D: (in, out)).
    """
    dtype = ws[0].lora_a.dtype
    out_f, in_f = ws[0].lora_b.shape[0], ws[0].lora_a.shape[1]
    a = torch.zeros(rank, in_f, dtype=dtype)
    b = torch.zeros(out_f, rank, dtype=dtype)
    scale = torch.zeros(rank, dtype=dtype)
    lora_bias = torch.zeros(out_f, dtype=dtype)
    at = 0
    for w in ws:
        r = w.rank
        a[at:at + r] = w.lora_a
        b[:, at:at + r] = w.lora_b
        scale[at:at + r] = w.scale * multiplier
        if w.bias is not None:
            lora_bias += w.scale * multiplier * w.bias.to(dtype)
        at += r
    out = {"lora_a": a.T.contiguous() if kind == "embedding" else a, "lora_b": b, "scale": scale}
    if any(w.bias is not None for w in ws):
        out["lora_bias"] = lora_bias
    dora = [w for w in ws if w.magnitude is not None]
    if dora:
        assert len(ws) == 1 and weight is not None, "DoRA is applied alone (checked by combined_modules)"
        w = dora[0].scaled(multiplier) if multiplier != 1.0 else dora[0]
        weight_oi = weight.T if kind == "conv1d" else weight
        ds = _dora_scale(w, weight_oi.detach())
        out["dora_scale"] = ds
        if bias is not None:
            out["dora_bias"] = (1 - ds) * bias.detach()
    return out


def fold_tensors(ws: list[LoraWeights], kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                 multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """Fold-mode tensors of one module: the merged weight (op layout) and, if changed, bias."""
    weight = weight.detach()
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
    if new_bias is not None and any(w.bias is not None for w in ws):
        out["bias"] = new_bias.to(weight.dtype)
    return out


class LoraState:
    """The adapters being applied and the tensors built from them, shared by every graph.

    One module's tensors are built the first time a graph shows its op (the base weight is needed
    for fold and DoRA) and reused by later graphs (prefill, decode, recompiles), so a swap that
    refills them in place reaches every compiled graph at once.
    """

    def __init__(self, adapters: list[Adapter], mode: str, max_rank: int | None = None):
        from .adapter import combined_modules, combined_overrides

        if mode not in ("branch", "fold"):
            raise ValueError(f"mode: expected 'branch' or 'fold', found {mode!r}")
        self.mode = mode
        self.adapters = adapters
        self.modules = combined_modules(adapters)
        self.overrides = combined_overrides(adapters)
        needed = max((sum(w.rank for w in ws) for ws in self.modules.values()), default=0)
        if max_rank is not None and max_rank < needed:
            raise SwapError(f"max_rank: expected at least the adapters' largest rank {needed}, found {max_rank}")
        self.rank = max_rank or needed
        self.multiplier = 1.0
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.base: dict[str, tuple[str, torch.Tensor | None, torch.Tensor | None]] = {}
        self.override_tensors: dict[str, torch.Tensor] = {}

    def module_tensors(self, fqn: str, kind: str, weight: torch.Tensor | None,
                       bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The tensors of module ``fqn`` (built on first use)."""
        if fqn not in self.tensors:
            self.base[fqn] = (kind, weight, bias)
            self.tensors[fqn] = self._build(fqn)
        return self.tensors[fqn]

    def override(self, path: str) -> torch.Tensor:
        if path not in self.override_tensors:
            self.override_tensors[path] = self.overrides[path].clone()
        return self.override_tensors[path]

    def _build(self, fqn: str) -> dict[str, torch.Tensor]:
        kind, weight, bias = self.base[fqn]
        ws = self.modules[fqn]
        if self.mode == "fold":
            return fold_tensors(ws, kind, weight, bias, self.multiplier)
        t = branch_tensors(ws, self.rank, kind, weight, bias, self.multiplier)
        for role in ("lora_a", "lora_b"):
            t[role] = torch.nn.Parameter(t[role])
        return t

    def parameters(self) -> list[torch.nn.Parameter]:
        """Branch mode's trainable A and B tensors, module by module."""
        return [t for ts in self.tensors.values() for t in ts.values() if isinstance(t, torch.nn.Parameter)]
