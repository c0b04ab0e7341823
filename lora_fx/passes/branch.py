"""Branch pass: keep the base op, add the low-rank update after it.

For a linear / Conv1D site y = x W^T + b (x: [..., in], y: [..., out]):

    y' = y + (scale * (x A^T)) B^T + lora_bias               A (R, in), B (out, R), scale (R,)
    y' = dora_scale * (y + (scale * (x A^T)) B^T) + dora_bias   (DoRA)

For an embedding site y = W[idx]: y' = y + (scale * A^T[idx]) B^T, with A^T stored (vocab, R).
The update is computed in the adapter's dtype and cast back to y's dtype, as PEFT does.

How the update is written depends on what the graph's fake values tell (x flattened to M tokens):

- M static and at most ``fuse_tokens`` (decode): ``sum(x[:, None, :] * A, -1)`` and
  ``y + sum(h[:, None, :] * B, -1)``. No GEMM call is left: Inductor fuses the two small
  reductions and the add into the kernels around the base op (the base's GEMM count is kept).
- otherwise: ``h = mm(x, A^T) * scale`` and ``addmm(y, h, B^T)``: the expand accumulates into a
  copy of y (beta = 1), which on CPU BLAS runs about twice as fast as a separate mm + add for
  rank-sized K, and leaves no add kernel.
- no fake values (symbolic_trace), or an adapter dtype narrower than y's: linear + add, as PEFT.
"""

from __future__ import annotations

import math
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


def _tokens(site: Site) -> int | None:
    """How many rows (tokens) the site's op computes, when static."""
    meta = tensor_meta(site.x)
    if meta is None:
        return None
    dims = meta.shape if site.kind == "embedding" else meta.shape[:-1]
    return math.prod(dims) if all(isinstance(d, int) for d in dims) else None


def _small_matmul(graph: fx.Graph, a: fx.Node, w: fx.Node) -> fx.Node:
    """a @ w^T for a [M, K], w [N, K], as ``sum(a[:, None, :] * w, -1)``: no GEMM call, fusable."""
    return call(graph, aten.sum.dim_IntList, (
        call(graph, aten.mul.Tensor, (call(graph, aten.unsqueeze.default, (a, 1)), w)), [-1]))


def _update(graph: fx.Graph, site: Site, t: dict[str, fx.Node], lora_dtype: torch.dtype, fused: bool) -> fx.Node:
    """y + the update, in the adapter's dtype, with x and y flattened to [M, in] / [M, out]."""
    y = _cast(graph, site.node, lora_dtype)  # exact: the adapter dtype is at least as wide
    if site.kind == "embedding":
        h = call(graph, aten.embedding.default, (t["lora_a"], call(graph, aten.flatten.using_ints, (site.x,))))
    else:
        x = call(graph, aten.flatten.using_ints, (_cast(graph, site.x, lora_dtype), 0, -2))  # [M, in]
        h = (_small_matmul(graph, x, t["lora_a"]) if fused
             else call(graph, aten.mm.default, (x, call(graph, aten.t.default, (t["lora_a"],)))))  # [M, R]
    h = call(graph, aten.mul.Tensor, (h, t["scale"]))
    if fused:
        d = _small_matmul(graph, h, t["lora_b"])  # [M, out]
        out = call(graph, aten.add.Tensor, (y, call(graph, aten.view_as.default, (d, y))))
    else:
        y2 = call(graph, aten.flatten.using_ints, (y, 0, -2))
        out = call(graph, aten.view_as.default, (
            call(graph, aten.addmm.default, (y2, h, call(graph, aten.t.default, (t["lora_b"],)))), y))
    if "lora_bias" in t:
        out = call(graph, aten.add.Tensor, (out, t["lora_bias"]))
    return out


def insert_lora_branch(site: Site, t: dict[str, fx.Node], lora_dtype: torch.dtype, fuse_tokens: int = 0) -> fx.Node:
    """Add the update after ``site``'s op (in the graph that holds it) and route the op's users to it;
    returns the new output."""
    graph, y = site.graph, site.node
    users = list(y.users)
    meta = tensor_meta(y)
    with graph.inserting_before(y.next):
        if meta is not None and meta.dim() >= 2 and torch.promote_types(meta.dtype, lora_dtype) == lora_dtype:
            m = _tokens(site)
            out = _update(graph, site, t, lora_dtype, fused=m is not None and m <= fuse_tokens)
        else:
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


def insert_lora_branches(sites: list[Site], tensors: Callable[[Site], tuple[dict[str, fx.Node], torch.dtype]],
                         fuse_tokens: int = 0) -> int:
    """Insert the LoRA branch at every site; ``tensors(site)`` gives its input nodes and dtype."""
    for site in sites:
        nodes, dtype = tensors(site)
        insert_lora_branch(site, nodes, dtype, fuse_tokens)
    return len(sites)
