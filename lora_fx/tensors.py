"""Pure builders: adapters (and a base weight) in, the tensors a rewritten graph reads out.

Branch mode, per module and slot (adapters summed into one slot are concatenated along the rank
and padded to the rank budget R):

    lora_a     (R, in)    A's rows; embeddings keep A transposed, (vocab, R), for a lookup
    lora_b     (out, R)   B's columns
    scale      (R,)       each rank's scale (0 in padding), times the global multiplier
    lora_bias  (out,)     sum of scale * lora_B.bias                     (lora_bias adapters)
    dora_scale (out,)     m / ||W + (B * scale) A||, per row             (DoRA)
    dora_bias  (out,)     (1 - dora_scale) * b                           (DoRA, base bias present)

Fold mode, per module: ``weight`` = W + sum(scale * B A) (DoRA: m / ||.|| times that), in the op's
own layout, and ``bias`` when lora_bias changes it.

Nothing here keeps state; ``LoraState`` decides when to call these and where the results go.
"""

from __future__ import annotations

import torch

from .adapter import LoraWeights

IDENTITY = {"lora_bias": 0.0, "dora_scale": 1.0, "dora_bias": 0.0}  # a coefficient's value when unused


def as_out_in(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The op's weight in (out, in) layout: Conv1D stores (in, out), Linear (out, in)."""
    return weight.T if kind == "conv1d" else weight


def padded_ab(ws: list[LoraWeights], rank: int, shape: tuple[int, int], dtype: torch.dtype,
              embedding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A (R, in) and B (out, R) of the summed adapters ``ws``, zero-padded to ``rank``.

    Embeddings: A is returned transposed, (vocab, R), the layout of a lookup.
    """
    out_f, in_f = shape
    a, b = torch.zeros(rank, in_f, dtype=dtype), torch.zeros(out_f, rank, dtype=dtype)
    at = 0
    for w in ws:
        a[at:at + w.rank], b[:, at:at + w.rank] = w.lora_a, w.lora_b
        at += w.rank
    return (a.T.contiguous() if embedding else a), b


def rank_scale(ws: list[LoraWeights], rank: int, multiplier: float, dtype: torch.dtype) -> torch.Tensor:
    """(R,): each rank slot's scale times ``multiplier``; 0 in the padding."""
    scale, at = torch.zeros(rank, dtype=dtype), 0
    for w in ws:
        scale[at:at + w.rank] = w.scale * multiplier
        at += w.rank
    return scale


def lora_bias(ws: list[LoraWeights], multiplier: float, out_f: int, dtype: torch.dtype) -> torch.Tensor:
    """(out,): sum of scale * multiplier * lora_B.bias over the adapters that have one."""
    total = torch.zeros(out_f, dtype=dtype)
    for w in ws:
        if w.bias is not None:
            total += w.scale * multiplier * w.bias.to(dtype)
    return total


def dora_coefficients(weight_oi: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                      scale: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DoRA's per-row m / ||W + (B * scale) A|| and (1 - that) * bias, from the current A and B.

    ``a`` (R, in), ``b`` (out, R), ``scale`` (R,) are what the graph reads, so a trained A / B is
    what the norm sees, as PEFT computes it from its current weights (detached).
    """
    w = weight_oi.detach()
    merged = w.float() + (b.detach().float() * scale.float()) @ a.detach().float()
    ds = (magnitude.float() / torch.linalg.norm(merged, dim=1)).to(w.dtype)
    return ds, (None if bias is None else (1 - ds) * bias.detach())


def fold_tensors(ws: list[LoraWeights], kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                 multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """Fold-mode tensors of one module: the merged weight (op layout) and, if changed, bias."""
    weight = weight.detach()
    ws = [w.to(weight.device) for w in ws]
    w_oi = as_out_in(weight, kind).float()
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
    out = {"weight": as_out_in(w_oi, kind).to(weight.dtype).contiguous()}
    if any(w.bias is not None for w in ws):
        out["bias"] = new_bias.to(weight.dtype)
    return out
