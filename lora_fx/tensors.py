"""Pure builders: adapters (and a base weight) in, the tensors a rewritten graph reads out.

Branch mode, per module and slot (adapters summed into one slot are concatenated along the rank
and padded to the rank budget R):

    lora_a     (R, in)    A's rows; embeddings keep A transposed, (vocab, R), for a lookup;
                          convs keep A's kernel, (R, in, *k)
    lora_b     (out, R)   B's columns; convs (out, R, *1), a grouped B made dense
    scale      (R,)       each rank's scale (0 in padding), times the global multiplier
    lora_bias  (out,)     sum of scale * lora_B.bias                     (lora_bias, mixed batches)
    dora_scale (out,)     m / ||W + (B * scale) A||, per row             (DoRA, mixed batches)
    dora_bias  (out,)     (1 - dora_scale) * b                           (DoRA, base bias, mixed batches)

With one adapter set, lora_B's bias and DoRA's magnitude are trained parameters (``lora_b_bias``,
``magnitude``: see ``training.Weights``) and the graph computes the terms from them and from

    bias_scale    (1,)    the bias's scale (see bias_parts), times the multiplier
    dora_inv_norm (out,)  1 / ||W + (B * scale) A|| (detached, as PEFT's); 0 while off
    dora_off      (1,)    1 while the update is off (the DoRA scale is then 1), else 0

Fold mode, per module: ``weight`` = W + sum(scale * B A) (DoRA: m / ||.|| times that), in the op's
own layout, and ``bias`` when lora_bias changes it; DoRA: ``row_scale`` (out,), the m / ||.|| that
scales W's gradient per output row (PEFT's norm is detached), for a graph that trains the base.

Nothing here keeps state; ``LoraState`` decides when to call these and where the results go.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .adapter import LoraWeights, regrouped, ungrouped

IDENTITY = {"lora_bias": 0.0, "dora_scale": 1.0, "dora_bias": 0.0, "dora_off": 1.0}  # a coefficient's value when unused


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_FIRST_INNER: dict[type, str] = {}  # a wrapper subclass -> the name of its first inner tensor


def address(t: torch.Tensor) -> int:
    """Where ``t``'s data lies: its storage address or, for a wrapper tensor subclass (torchao's
    quantized weights, NF4, DTensor), whose own ``data_ptr()`` is 0, its first inner tensor's; for
    a tensor with no storage to point to, the object's identity."""
    if type(t) in _PLAIN:  # the per-call check's common case, without the subclass test
        return t.data_ptr()
    while is_traceable_wrapper_subclass(t):
        inner = getattr(t, _FIRST_INNER.get(type(t), ""), None)
        if not isinstance(inner, torch.Tensor):  # first seen (or an optional inner tensor absent here)
            name = _FIRST_INNER[type(t)] = t.__tensor_flatten__()[0][0]
            inner = getattr(t, name)
        t = inner
    try:
        return t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


def as_out_in(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The op's weight as an (out, in) matrix, the layout B A has: Conv1D and Embedding store
    (in, out) / (vocab, dim) and are transposed; a conv kernel (out, in / groups, *k) is flattened."""
    if kind in ("conv1d", "embedding"):
        return weight.T
    return weight.flatten(1) if kind == "conv" else weight


def from_out_in(matrix: torch.Tensor, kind: str, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`as_out_in`: ``matrix`` in the layout of ``like``, the op's weight."""
    if kind in ("conv1d", "embedding"):
        return matrix.T
    return matrix.reshape(like.shape) if kind == "conv" else matrix


def padded_ab(ws: list[LoraWeights], rank: int, shape: tuple[int, int], kernel: tuple[int, ...],
              dtype: torch.dtype, embedding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A (R, in, *k) and B (out, R, *1) of the summed adapters ``ws``, zero-padded to ``rank``
    (a grouped conv's B made dense, block-diagonal). ``shape``: (out, in); ``kernel``: a conv's.

    Embeddings: A is returned transposed, (vocab, R), the layout of a lookup.
    """
    out_f, in_f = shape
    a = torch.zeros(rank, in_f, *kernel, dtype=dtype)
    b = torch.zeros(out_f, rank, *(1,) * len(kernel), dtype=dtype)
    at = 0
    for w in ws:
        a[at:at + w.rank], b[:, at:at + w.rank] = w.lora_a, ungrouped(w.lora_b, w.groups)
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


def bias_parts(ws: list[LoraWeights], out_f: int, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """lora_B's bias as branch mode trains it, and the factor the graph scales it by (times the
    multiplier): the one adapter's bias and its scale, as PEFT trains it; for summed adapters with
    several, their scale * bias summed and 1 (not trainable as PEFT's); none: zeros."""
    biased = [w for w in ws if w.bias is not None]
    if len(biased) == 1:
        return biased[0].bias.to(dtype).clone(), biased[0].scale
    return lora_bias(ws, 1.0, out_f, dtype), 1.0


def dora_delta(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, kind: str, rank: int = 0,
               groups: int = 1) -> torch.Tensor:
    """The (out, in) matrix DoRA's norm adds to the weight, from the tensors the graph reads: A
    (R, in, *k) (embeddings: (vocab, R)), B (out, R, *1) dense, ``scale`` (R,).

    A grouped conv follows PEFT's formula, ``B.view(-1, r) @ A.view(r, -1)`` reshaped to the
    weight's shape, on lora_B in its grouped layout (``rank``: the adapter's r, ``groups``).
    """
    a, b, scale = a.detach().float(), b.detach().float(), scale.detach().float()
    if kind == "conv" and groups > 1:
        native = regrouped(b[:, :rank], groups)
        return scale[0] * (native.reshape(-1, rank) @ a[:rank].reshape(rank, -1)).reshape(b.shape[0], -1)
    a_m = a.T if kind == "embedding" else a.flatten(1)
    return (b.flatten(1) * scale) @ a_m


def dora_coefficients(weight_oi: torch.Tensor, bias: torch.Tensor | None, delta: torch.Tensor,
                      magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DoRA's per-output m / ||W + delta|| and (1 - that) * bias (``delta``: :func:`dora_delta`).

    Computed from the current A and B, so a trained A / B is what the norm sees, as PEFT computes it
    from its current weights (detached).
    """
    w = weight_oi.detach()
    ds = (magnitude.float().reshape(-1) / torch.linalg.norm(w.float() + delta, dim=1)).to(w.dtype)
    return ds, (None if bias is None else (1 - ds) * bias.detach())


def fold_tensors(ws: list[LoraWeights], kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                 multiplier: float = 1.0, groups: int = 1) -> dict[str, torch.Tensor]:
    """Fold-mode tensors of one module: the merged weight (op layout) and, if changed, bias.

    A sharded (DTensor) weight is gathered first: the result is the whole merged tensor. A grouped
    conv (``groups`` > 1) folds into its dense kernel (out, in, *k): B A mixes the groups, so the
    op then runs with groups=1."""
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    weight, bias = full(weight.detach()), None if bias is None else full(bias.detach())
    grouped, weight = weight, ungrouped(weight, groups)
    ws = [w.to(weight.device) for w in ws]
    w_oi = as_out_in(weight, kind).float()
    new_bias = None if bias is None else bias.detach().float()
    row_scale = torch.ones(w_oi.shape[0], device=w_oi.device)  # dW'/dW per output row (DoRA's m / ||.||)
    for w in ws:
        delta = w.delta_weight() * multiplier
        if w.magnitude is not None:
            merged = w_oi + delta
            norm_of = merged
            if groups > 1:  # PEFT's DoRA norm: the grouped kernel + B.view(-1, r) @ A.view(r, -1) in its shape
                quirk = (w.lora_b.float().reshape(-1, w.rank) @ w.lora_a.float().reshape(w.rank, -1))
                norm_of = grouped.float().flatten(1) + w.scale * multiplier * quirk.reshape(grouped.shape[0], -1)
            factor = w.magnitude.float().reshape(-1) / torch.linalg.norm(norm_of, dim=1)
            w_oi, row_scale = factor.view(-1, 1) * merged, row_scale * factor
        else:
            w_oi = w_oi + delta
        if w.bias is not None:
            extra = w.scale * multiplier * w.bias.float()
            new_bias = extra if new_bias is None else new_bias + extra
    out = {"weight": from_out_in(w_oi, kind, weight).to(weight.dtype).contiguous()}
    if any(w.bias is not None for w in ws):
        out["bias"] = new_bias.to(weight.dtype)
    if any(w.magnitude is not None for w in ws):
        out["row_scale"] = row_scale.to(weight.dtype)
    return out
