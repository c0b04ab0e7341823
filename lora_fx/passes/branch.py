"""Branch pass: keep the base op, add the low-rank update after it.

For a linear / Conv1D site y = x W^T + b (x: [..., in], y: [..., out]):

    y' = y + (scale * (x A^T)) B^T + lora_bias               A (R, in), B (out, R), scale (R,)
    y' = dora_scale * (y + (scale * (x A^T)) B^T) + dora_bias   (DoRA)

For an embedding site y = W[idx]: y' = y + (scale * A^T[idx]) B^T, with A^T stored (vocab, R).
For a parameter site (LoRA merged into a parameter W read by any op): W' = W + (B * scale) A in
the graph, read by every op that read W.
For a conv site (x: [N, in, *spatial]): y' = y + conv1x1(scale * conv(x, A), B) + lora_bias, A
(R, in, *k) with the base's stride and padding, B (out, R, *1), the 1x1 conv written as a linear
map over the channel dim; per-channel terms broadcast over the spatial dims.
The update is computed in the adapter's dtype and cast back to y's dtype, as PEFT does.

How the update is written depends on what the graph's fake values tell (x flattened to M tokens):

- M static and at most ``fuse_tokens`` (decode): ``sum(x[:, None, :] * A, -1)`` and
  ``y + sum(h[:, None, :] * B, -1)``. No GEMM call is left: Inductor fuses the two small
  reductions and the add into the kernels around the base op (the base's GEMM count is kept).
- otherwise: ``h = mm(x, (A * scale)^T)`` and ``addmm(y, h, B^T)``: the expand accumulates into a
  copy of y (beta = 1), which on CPU BLAS runs about twice as fast as a separate mm + add for
  rank-sized K, and leaves no add kernel. Sites that read the same input (q / k / v, gate / up)
  share one shrink, ``mm(x, cat(A_i * scale_i)^T)`` sliced per site: one GEMM of width sum(R_i)
  instead of several rank-wide ones (about 2 points of prefill time over an NF4 base). Over a
  torchao weight, y is pointwise ops after a GEMM: the expand is ``mm`` and the add is left to
  Inductor, fused with those ops (see insert_lora_branches).
- no fake values (symbolic_trace), or an adapter dtype narrower than y's: linear + add, as PEFT.

With ``lora_dropout`` in a training graph, x is dropped before A (a mask per module, so no shared
shrink): see :mod:`lora_fx.dropout`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection

import torch
from torch import fx

from ..dropout import drop
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


def _lookup(graph: fx.Graph, site: Site, a_t: fx.Node, ids: fx.Node) -> fx.Node:
    """A^T[ids] with the base embedding's padding_idx and scale_grad_by_freq, as PEFT looks A up
    (they change only the gradient: no gradient reaches A's padding row)."""
    e = site.embedding_args()
    return call(graph, aten.embedding.default, (a_t, ids, e["padding_idx"], e["scale_grad_by_freq"]))


def _shrink(graph: fx.Graph, x: fx.Node, ts: list[dict[str, fx.Node]], ranks: list[int],
            lora_dtype: torch.dtype) -> list[fx.Node]:
    """scale * (x A^T) ([M, R]) for every adapter in ``ts`` (of ``ranks`` rows) over the same input
    x, as one GEMM: ``mm(x, cat(A_i * scale_i)^T)`` sliced per adapter."""
    x = call(graph, aten.flatten.using_ints, (_cast(graph, x, lora_dtype), 0, -2))  # [M, in]
    scaled = [call(graph, aten.mul.Tensor, (t["lora_a"], call(graph, aten.unsqueeze.default, (t["scale"], 1))))
              for t in ts]
    a = scaled[0] if len(scaled) == 1 else call(graph, aten.cat.default, (scaled,))
    h = call(graph, aten.mm.default, (x, call(graph, aten.t.default, (a,))))  # [M, sum R]
    if len(ts) == 1:
        return [h]
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    return [call(graph, aten.slice.Tensor, (h, 1, start, start + r)) for start, r in zip(starts, ranks)]


def _update(graph: fx.Graph, site: Site, t: dict[str, fx.Node], lora_dtype: torch.dtype, fused: bool,
            h: fx.Node | None, accumulate: bool = True) -> fx.Node:
    """y + the update, in the adapter's dtype, with x and y flattened to [M, in] / [M, out];
    ``h``: scale * (x A^T), when computed already (see _shrink); ``accumulate``: the expand as
    ``addmm`` into y, else ``mm`` and an add left to Inductor."""
    y = _cast(graph, site.node, lora_dtype)  # exact: the adapter dtype is at least as wide
    if h is None and site.kind == "embedding":
        ids = call(graph, aten.flatten.using_ints, (site.x,))
        h = call(graph, aten.mul.Tensor, (_lookup(graph, site, t["lora_a"], ids), t["scale"]))
    elif h is None:  # fused, or with dropout; else the GEMM form's h comes from a shared shrink
        x = call(graph, aten.flatten.using_ints, (_cast(graph, site.x, lora_dtype), 0, -2))  # [M, in]
        x = drop(graph, x, t["dropout"]) if "dropout" in t else x  # lora_dropout: A's input only
        xa = _small_matmul(graph, x, t["lora_a"]) if fused else \
            call(graph, aten.mm.default, (x, call(graph, aten.t.default, (t["lora_a"],))))
        h = call(graph, aten.mul.Tensor, (xa, t["scale"]))  # [M, R]
    if fused or not accumulate:
        d = (_small_matmul(graph, h, t["lora_b"]) if fused
             else call(graph, aten.mm.default, (h, call(graph, aten.t.default, (t["lora_b"],)))))  # [M, out]
        out = call(graph, aten.add.Tensor, (y, call(graph, aten.view_as.default, (d, y))))
    else:
        y2 = call(graph, aten.flatten.using_ints, (y, 0, -2))
        out = call(graph, aten.view_as.default, (
            call(graph, aten.addmm.default, (y2, h, call(graph, aten.t.default, (t["lora_b"],)))), y))
    if "lora_bias" in t:
        out = call(graph, aten.add.Tensor, (out, t["lora_bias"]))
    return out


def _conv_dims(site: Site) -> int:
    """How many spatial dims a conv site has (from its kernel: an unbatched input has one dim less)."""
    meta, stride = tensor_meta(site.weight), site.conv_args()["stride"]
    return meta.dim() - 2 if meta is not None else len(stride)


def _conv_update(graph: fx.Graph, site: Site, t: dict[str, fx.Node], lora_dtype: torch.dtype, dims: int) -> fx.Node:
    """y + B(A(x)) for a conv site, as PEFT's lora_B(lora_A(x)): A runs with the base's stride and
    padding (dilation 1, groups 1), the scale per rank channel, B as a 1x1 conv with lora_bias.
    The sum is taken in the wider of y's and the adapter's dtypes, as PEFT's ``result + lora``."""
    args = site.conv_args()
    x_meta, y_meta = tensor_meta(site.x), tensor_meta(site.node)
    x = _cast(graph, site.x, lora_dtype)
    x = drop(graph, x, t["dropout"]) if "dropout" in t else x
    unbatched = x_meta is not None and x_meta.dim() == dims + 1
    if unbatched:  # (C, *spatial): computed as a batch of one
        x = call(graph, aten.unsqueeze.default, (x, 0))
    h = site.conv_call(graph, x, t["lora_a"], None, stride=args["stride"], padding=args["padding"], dims=dims)
    h = call(graph, aten.mul.Tensor, (h, _channels(graph, t["scale"], dims)))
    # B as a 1x1 conv is a linear map over the channel dim: channels last, linear, channels back
    last = call(graph, aten.permute.default, (h, [0, *range(2, dims + 2), 1]))
    b = call(graph, aten.flatten.using_ints, (t["lora_b"], 1))  # (out, R)
    d = call(graph, aten.linear.default, (last, b, t.get("lora_bias")))
    d = call(graph, aten.permute.default, (d, [0, dims + 1, *range(1, dims + 1)]))
    if unbatched:
        d = call(graph, aten.squeeze.dim, (d, 0))
    narrower = y_meta is not None and torch.promote_types(y_meta.dtype, lora_dtype) != lora_dtype
    return call(graph, aten.add.Tensor, (site.node if narrower else _cast(graph, site.node, lora_dtype), d))


def _channels(graph: fx.Graph, v: fx.Node, dims: int) -> fx.Node:
    """A per-channel vector (C,) viewed as (C, *1) to broadcast over a conv's spatial dims."""
    return call(graph, aten.view.default, (v, [-1] + [1] * dims))


def _form(site: Site, lora_dtype: torch.dtype, fuse_tokens: int) -> str:
    """How the update of a linear / Conv1D / embedding site is written (see the module's docstring):
    "fused", "gemm", or "plain" (linear + add)."""
    meta = tensor_meta(site.node)
    if meta is None or meta.dim() < 2 or torch.promote_types(meta.dtype, lora_dtype) != lora_dtype:
        return "plain"
    m = _tokens(site)
    return "fused" if m is not None and m <= fuse_tokens else "gemm"


def _trained_terms(graph: fx.Graph, site: Site, t: dict[str, fx.Node]) -> dict[str, fx.Node]:
    """``t`` with the terms made from trained parameters (one adapter set, see tensors): lora_bias =
    bias_scale * lora_B's bias; DoRA's m / ||W + s B A|| = magnitude * dora_inv_norm + dora_off
    (the norm detached, as PEFT's) and (1 - that) * b, so the gradients reach them as PEFT's do."""
    t = dict(t)
    if "lora_b_bias" in t:
        t["lora_bias"] = call(graph, aten.mul.Tensor, (t.pop("lora_b_bias"), t.pop("bias_scale")))
    if "magnitude" in t:
        inv, m = t.pop("dora_inv_norm"), t.pop("magnitude")
        m = _cast(graph, m, tensor_meta(inv).dtype) if tensor_meta(inv) is not None else m
        ds = t["dora_scale"] = call(graph, aten.add.Tensor, (call(graph, aten.mul.Tensor, (m, inv)), t.pop("dora_off")))
        if site.bias is not None:
            t["dora_bias"] = call(graph, aten.mul.Tensor, (call(graph, aten.rsub.Scalar, (ds, 1)), site.bias))
    return t


def insert_lora_branch(site: Site, t: dict[str, fx.Node], lora_dtype: torch.dtype, fuse_tokens: int = 0,
                       h: fx.Node | None = None, accumulate: bool = True) -> fx.Node:
    """Add the update after ``site``'s op (in the graph that holds it) and route the op's users to it;
    returns the new output. ``h``, ``accumulate``: see _update."""
    graph, y = site.graph, site.node
    users = list(y.users)
    with graph.inserting_before(y.next):
        t = _trained_terms(graph, site, t)
        dora = {k: t[k] for k in ("dora_scale", "dora_bias") if k in t}
        if site.kind == "conv":
            dims = _conv_dims(site)
            out = _conv_update(graph, site, t, lora_dtype, dims)
            dora = {k: _channels(graph, v, dims) for k, v in dora.items()}
        elif (form := _form(site, lora_dtype, fuse_tokens)) != "plain":
            out = _update(graph, site, t, lora_dtype, form == "fused", h, accumulate)
        else:
            if site.kind == "embedding":
                h = _lookup(graph, site, t["lora_a"], site.x)  # [..., R]
            else:
                x = _cast(graph, site.x, lora_dtype)
                x = drop(graph, x, t["dropout"]) if "dropout" in t else x
                h = call(graph, aten.linear.default, (x, t["lora_a"]))  # [..., R]
            h = call(graph, aten.mul.Tensor, (h, t["scale"]))
            d = call(graph, aten.linear.default, (h, t["lora_b"], t.get("lora_bias")))  # [..., out]
            out = call(graph, aten.add.Tensor, (y, d))
        if "dora_scale" in dora:
            out = call(graph, aten.mul.Tensor, (out, dora["dora_scale"]))
            if "dora_bias" in dora:
                out = call(graph, aten.add.Tensor, (out, dora["dora_bias"]))
        out = _restore_dtype(graph, out, y, lora_dtype)
    for user in users:
        user.replace_input_with(y, out)
    return out


def insert_param_branch(site: Site, t: dict[str, fx.Node], lora_dtype: torch.dtype) -> fx.Node:
    """LoRA merged into a parameter in the graph: every op that read W reads W + (B * scale) A
    (PEFT's ParamWrapper and MultiheadAttention merge it the same way); returns W'."""
    graph, w = site.graph, site.node
    first = next(n for n in graph.nodes if n in w.users)
    with graph.inserting_before(first):
        b = call(graph, aten.mul.Tensor, (t["lora_b"], t["scale"]))  # (out, R) * (R,)
        delta = _restore_dtype(graph, call(graph, aten.mm.default, (b, t["lora_a"])), w, lora_dtype)
        new = call(graph, aten.add.Tensor, (w, delta))
    site.set_weight(new)
    return new


def _side_effect(node: fx.Node) -> bool:
    """Whether ``node`` may write a tensor in place or change how later ops run (grad mode,
    autocast, a higher-order op's body): a shrink must not be moved across it."""
    if node.op in ("call_module", "call_method"):
        return node.op == "call_module" or node.target.endswith("_") or node.target.startswith("__set")
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    name = getattr(target, "__name__", "")
    return target is operator.setitem or name.endswith("_") or "grad" in name or "autocast" in name


def _runs(members: list, order: dict[fx.Node, int], nodes: list[fx.Node]) -> list[list]:
    """``members`` (in graph order) split wherever a node between two of them has a side effect:
    the sites of one run can share a shrink computed before the first of them. ``nodes``: the
    graph's nodes, ``order`` their positions."""
    runs = [[members[0]]]
    for prev, cur in zip(members, members[1:]):
        if any(_side_effect(n) for n in nodes[order[prev[0].node] + 1:order[cur[0].node]]):
            runs.append([])
        runs[-1].append(cur)
    return runs


def insert_lora_branches(sites: list[Site], tensors: Callable[[Site], tuple[dict[str, fx.Node], torch.dtype, int]],
                         fuse_tokens: int = 0, pointwise: Collection[str] = ()) -> int:
    """Insert the LoRA branch at every site; ``tensors(site)`` gives its input nodes, dtype and rank.
    Sites written with GEMMs that read the same input in the same dtype share one shrink GEMM.
    ``pointwise``: modules whose output Inductor computes with pointwise ops after a GEMM (a
    torchao weight's linear: the dequantization's scales); their expand is ``mm`` plus an add that
    Inductor fuses with those ops, where ``addmm`` would first write y out and copy it."""
    given = [(site, *tensors(site)) for site in sites]
    groups: dict[tuple, list[tuple[Site, dict[str, fx.Node], int]]] = {}
    for site, nodes, dtype, rank in given:
        if site.kind not in ("conv", "embedding", "param") and _form(site, dtype, fuse_tokens) == "gemm" \
                and "dropout" not in nodes:  # a mask per module: no shared shrink
            groups.setdefault((id(site.graph), site.x, dtype), []).append((site, nodes, rank))
    shrunk: dict[int, fx.Node] = {}
    walks: dict[int, tuple[list[fx.Node], dict[fx.Node, int]]] = {}  # one walk per graph
    for (_, x, dtype), members in groups.items():
        graph = members[0][0].graph
        if id(graph) not in walks:
            nodes = list(graph.nodes)
            walks[id(graph)] = nodes, {n: i for i, n in enumerate(nodes)}
        nodes, order = walks[id(graph)]
        for run in _runs(sorted(members, key=lambda m: order[m[0].node]), order, nodes):
            with graph.inserting_before(run[0][0].node):  # x and the adapter's inputs come before it
                hs = _shrink(graph, x, [t for _, t, _ in run], [r for _, _, r in run], dtype)
            shrunk.update({id(s): h for (s, _, _), h in zip(run, hs)})
    for site, nodes, dtype, _ in given:
        if site.kind == "param":
            insert_param_branch(site, nodes, dtype)
        else:
            insert_lora_branch(site, nodes, dtype, fuse_tokens, shrunk.get(id(site)), site.fqn not in pointwise)
    return len(sites)
