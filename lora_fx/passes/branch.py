"""Branch pass: keep the base op, add the low-rank update after it.

For a linear / Conv1D site y = x W^T + b (x: [..., in], y: [..., out]):

    y' = y + (scale * (x A^T)) B^T + lora_bias               A (R, in), B (out, R), scale (R,)
    y' = dora_scale * (y + (scale * (x A^T)) B^T) + dora_bias   (DoRA)

For an embedding site y = W[idx]: y' = y + (scale * A^T[idx]) B^T, with A^T stored (vocab, R).
The update is computed in the adapter's dtype and cast back to y's dtype, as PEFT does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from ..graph import MARK, Site, call, tensor_meta

aten = torch.ops.aten


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    meta = tensor_meta(node)
    if meta is None:  # graphs without fake values (symbolic_trace): Tensor.to is a no-op when equal
        new = graph.call_method("to", (node, dtype))
        new.meta[MARK] = True
        return new
    if meta.dtype == dtype:
        return node
    return call(graph, aten._to_copy.default, (node,), {"dtype": dtype})


def _restore_dtype(graph: fx.Graph, out: fx.Node, like: fx.Node, lora_dtype: torch.dtype) -> fx.Node:
    want = tensor_meta(like)
    if want is None:
        new = graph.call_method("type_as", (out, like))
        new.meta[MARK] = True
        return new
    if torch.promote_types(want.dtype, lora_dtype) == want.dtype:
        return out
    return call(graph, aten._to_copy.default, (out,), {"dtype": want.dtype})


def insert_lora_branch(graph: fx.Graph, site: Site, t: dict[str, fx.Node], lora_dtype: torch.dtype) -> fx.Node:
    """Add the update after ``site``'s op and route the op's users to it; returns the new output."""
    y = site.node
    users = list(y.users)
    with graph.inserting_before(y.next):
        if site.kind == "embedding":
            h = call(graph, aten.embedding.default, (t["lora_a"], site.x))  # [..., R]
        else:
            h = call(graph, aten.linear.default, (_cast(graph, site.x, lora_dtype), t["lora_a"]))  # [..., R]
        h = call(graph, aten.mul.Tensor, (h, t["scale"]))
        d = call(graph, aten.linear.default, (h, t["lora_b"], t.get("lora_bias")))  # [..., out]
        out = call(graph, aten.add.Tensor, (y, d))
        if "dora_scale" in t:
            out = call(graph, aten.mul.Tensor, (out, t["dora_scale"]))
            if "dora_bias" in t:
                out = call(graph, aten.add.Tensor, (out, t["dora_bias"]))
        out = _restore_dtype(graph, out, y, lora_dtype)
    for user in users:
        user.replace_input_with(y, out)
    return out


def insert_lora_branches(graph: fx.Graph, sites: list[Site],
                         tensors: Callable[[Site], tuple[dict[str, fx.Node], torch.dtype]]) -> int:
    """Insert the LoRA branch at every site; ``tensors(site)`` gives its input nodes and dtype."""
    for site in sites:
        nodes, dtype = tensors(site)
        insert_lora_branch(graph, site, nodes, dtype)
    return len(sites)
