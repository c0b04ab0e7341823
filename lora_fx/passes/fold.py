"""Fold pass: the base op reads W' = W + scale * B A (and b' for lora_bias) instead of W.

W' is computed once, outside the graph; the compiled code is the base model's with W' in place of
W, so it costs exactly what the base model costs.

A base trained through the graph (traced with gradients on, W requiring grad: a full fine-tune)
reads ``W' + (W - W.detach())`` instead: the value of W' (W - W.detach() is exactly 0) and the
gradient of W' flowing to W, which is PEFT's gradient of its base weight (dW'/dW = 1 for
W' = W + scale * B A). DoRA's W' = m / ||W + scale * B A|| (W + scale * B A) with the norm detached
(as PEFT's) scales that gradient per output row: ``(W - W.detach()) * row_scale``. Where the
gradient is not that (a grouped conv folded dense, in place, requantized), a backward through the
graph is refused instead (see collect.fold_trained_bases).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import fx

from ..graph import Site
from ..nodes import call, tensor_meta

aten = torch.ops.aten


def fold_lora_weights(sites: list[Site], tensors: Callable[[Site], dict[str, fx.Node]],
                      trained: Callable[[Site], Collection[str]] = lambda site: ()) -> int:
    """Point every site's weight (and bias, when folded) at the merged tensors; ``trained(site)``:
    the roles ("weight", "bias") whose base tensor the graph trains (read as W' + (W - W.detach()))."""
    for site in sites:
        t, roles = tensors(site), trained(site)
        if "weight" in t:  # folded into the model's own weight (in place): nothing to point at
            if "weight" in roles:
                new, ours = _with_gradient_of(site, t["weight"], site.weight, t.get("row_scale"))
                site.set_weight(new, keep=ours)
            else:
                site.set_weight(t["weight"])
            if site.kind == "conv" and site.conv_args()["groups"] != 1:
                site.set_conv_groups(1)  # a grouped conv's W' is dense (see tensors.fold_tensors)
        if "bias" in t:
            site.set_bias(_with_gradient_of(site, t["bias"], site.bias)[0] if "bias" in roles else t["bias"])
    return len(sites)


def _with_gradient_of(site: Site, folded: fx.Node, base: fx.Node,
                      row_scale: fx.Node | None = None) -> tuple[fx.Node, set[fx.Node]]:
    """``folded + (base - base.detach())``: folded's value, its gradient flowing to ``base``
    (times ``row_scale`` per output row: DoRA's dW'/dW); the new node and the nodes that read ``base``."""
    graph = site.graph
    first = site.node if site.kind != "param" else next(n for n in graph.nodes if n in base.users)
    with graph.inserting_before(first):
        detached = call(graph, aten.detach.default, (base,))
        diff = sub = call(graph, aten.sub.Tensor, (base, detached))
        if row_scale is not None:  # Conv1D (in, out) and Embedding (vocab, dim) keep the output dim last
            meta = tensor_meta(base)
            shape = [-1] + [1] * ((meta.dim() if meta is not None else 2) - 1)
            rows = row_scale if site.kind in ("conv1d", "embedding") else \
                call(graph, aten.view.default, (row_scale, shape))
            diff = call(graph, aten.mul.Tensor, (diff, rows))
        return call(graph, aten.add.Tensor, (folded, diff)), {detached, sub}
