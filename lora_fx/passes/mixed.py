"""Mixed-batch pass: each batch row gets its own adapter slot, in one graph.

For a linear site y = x W^T + b with x: [B, S, in] (or [B, in]) and the stacked slot tensors
A (N+1, R, in), B (N+1, out, R), scale (N+1, R):

    slot  = index[(arange(B) * rows) // B]            # [B]; rows selected, repeated for beams
    h     = bmm(x, A[slot]^T) * scale[slot]            # [B, S, R]
    y'    = y + bmm(h, B[slot]^T) + lora_bias[slot]     # [B, S, out]

Slot 0 is all zeros (the base model). Selecting rows writes ``index`` and ``rows`` in place, so
changing the selection, or the batch size within dynamic shapes, does not recompile.
Conv1D sites (x flattened to [B*S, in]) use the 3-D tensor the flattening view read.
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import GraphRewriteError
from ..graph import MARK, Site, tensor_meta
from .branch import _cast, _restore_dtype

aten = torch.ops.aten
VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, "view", "reshape")


def _op(graph: fx.Graph, target, args, kwargs=None) -> fx.Node:
    node = graph.call_function(target, args, kwargs or {})
    node.meta[MARK] = True
    return node


def batched_input(site: Site) -> tuple[fx.Node, bool]:
    """The [B, S, in] (or [B, in]) tensor the site reads, and whether it was flattened to 2-D."""
    x = site.x
    if site.kind != "conv1d":
        return x, False
    src = x.args[0] if x.op in ("call_function", "call_method") and x.target in VIEW_OPS and x.args else None
    meta = tensor_meta(src)
    if meta is None or meta.dim() != 3:
        raise GraphRewriteError(f"{site.fqn}: mixed batches need the Conv1D input as [B, S, in] before its "
                                "flattening view; found none")
    return src, True


def _slots(graph: fx.Graph, x: fx.Node, index: fx.Node, rows: fx.Node) -> fx.Node:
    meta = tensor_meta(x)
    batch = meta.shape[0]
    if not isinstance(batch, int):
        batch = _op(graph, aten.sym_size.int, (x, 0))
    ar = _op(graph, aten.arange.default, (batch,), {"dtype": torch.long, "device": meta.device})
    pos = _op(graph, aten.div.Tensor_mode, (_op(graph, aten.mul.Tensor, (ar, rows)), batch),
              {"rounding_mode": "floor"})
    return _op(graph, aten.index_select.default, (index, 0, pos))  # [B]


def insert_mixed_lora_branch(site: Site, t: dict[str, fx.Node], index: fx.Node, rows: fx.Node,
                             lora_dtype: torch.dtype, vocab: int = 0) -> fx.Node:
    """Add the per-row update after ``site``'s op and route its users to it (``vocab``: the
    embedding's row count, for embedding sites)."""
    graph, y = site.graph, site.node
    x, flattened = batched_input(site)
    meta = tensor_meta(x)
    if meta is None or meta.dim() not in (2, 3) or (site.kind == "embedding" and meta.dim() != 2):
        raise GraphRewriteError(f"{site.fqn}: mixed batches need inputs [B, S, in] or [B, in], "
                                f"found {None if meta is None else tuple(meta.shape)}")
    if "dora_scale" in t and (flattened or meta.dim() != 3):
        raise GraphRewriteError(f"{site.fqn}: DoRA in mixed batches needs linear inputs [B, S, in]")
    users = list(y.users)
    with graph.inserting_before(y.next):
        slot = _slots(graph, x, index, rows)

        def pick(role: str, unsqueeze: bool = True) -> fx.Node:
            sel = _op(graph, aten.index_select.default, (t[role], 0, slot))
            return _op(graph, aten.unsqueeze.default, (sel, 1)) if unsqueeze else sel

        if site.kind == "embedding":  # ids [B, S]; A stacked as ((N + 1) * vocab, R)
            offset = _op(graph, aten.mul.Tensor, (_op(graph, aten.unsqueeze.default, (slot, 1)), vocab))
            emb = site.embedding_args()  # frequencies counted on the offset ids: per slot, as PEFT per sub-batch
            h = _op(graph, aten.embedding.default, (t["lora_a"], _op(graph, aten.add.Tensor, (x, offset)), -1,
                                                    emb["scale_grad_by_freq"]))
            pad = emb["padding_idx"]
            if pad >= 0:  # as PEFT's lookup with padding_idx: no gradient reaches A's padding rows
                at_pad = _op(graph, aten.unsqueeze.default, (_op(graph, aten.eq.Scalar, (x, pad)), -1))
                h = _op(graph, aten.where.self, (at_pad, _op(graph, aten.detach.default, (h,)), h))
        else:
            xc = _cast(graph, x, lora_dtype)
            x3 = xc if meta.dim() == 3 else _op(graph, aten.unsqueeze.default, (xc, 1))
            a = _op(graph, aten.transpose.int, (pick("lora_a", unsqueeze=False), 1, 2))  # [B, in, R]
            h = _op(graph, aten.bmm.default, (x3, a))  # [B, S, R]
        h = _op(graph, aten.mul.Tensor, (h, pick("scale")))
        b = _op(graph, aten.transpose.int, (pick("lora_b", unsqueeze=False), 1, 2))  # [B, R, out]
        d = _op(graph, aten.bmm.default, (h, b))  # [B, S, out]
        if "lora_bias" in t:
            d = _op(graph, aten.add.Tensor, (d, pick("lora_bias")))
        if flattened:
            d = _op(graph, aten.reshape.default, (d, [-1, tensor_meta(y).shape[-1]]))
        elif meta.dim() == 2 and site.kind != "embedding":
            d = _op(graph, aten.squeeze.dim, (d, 1))
        out = _op(graph, aten.add.Tensor, (y, d))
        if "dora_scale" in t:
            out = _op(graph, aten.mul.Tensor, (out, pick("dora_scale")))
            if "dora_bias" in t:
                out = _op(graph, aten.add.Tensor, (out, pick("dora_bias")))
        out = _restore_dtype(graph, out, y, lora_dtype)
    for user in users:
        user.replace_input_with(y, out)
    return out
