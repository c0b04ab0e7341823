"""Fold pass: the base op reads W' = W + scale * B A (and b' for lora_bias) instead of W.

W' is computed once, outside the graph; the compiled code is the base model's with W' in place of
W, so it costs exactly what the base model costs.

A base trained through the graph (traced with gradients on, W requiring grad: a full fine-tune)
reads ``W' + (W - W.detach())`` instead: the value of W' (W - W.detach() is exactly 0) and the
gradient of W' flowing to W, which is PEFT's gradient of its base weight (dW'/dW = 1 for
W' = W + scale * B A). Where dW'/dW is not 1 (DoRA, a grouped conv folded dense, in place,
requantized), the rewrite refuses the backward instead (see rewrite.untrained_bases).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import fx

from ..graph import Site
from ..nodes import call

aten = torch.ops.aten


def fold_lora_weights(sites: list[Site], tensors: Callable[[Site], dict[str, fx.Node]],
                      trained: Callable[[Site], Collection[str]] = lambda site: ()) -> int:
    """Point every site's weight (and bias, when folded) at the merged tensors; ``trained(site)``:
    the roles ("weight", "bias") whose base tensor the graph trains (read as W' + (W - W.detach()))."""
    for site in sites:
        t, roles = tensors(site), trained(site)
        if "weight" in t:  # folded into the model's own weight (in place): nothing to point at
            if "weight" in roles:
                new, ours = _with_gradient_of(site, t["weight"], site.weight)
                site.set_weight(new, keep=ours)
            else:
                site.set_weight(t["weight"])
            if site.kind == "conv" and site.conv_args()["groups"] != 1:
                site.set_conv_groups(1)  # a grouped conv's W' is dense (see tensors.fold_tensors)
        if "bias" in t:
            site.set_bias(_with_gradient_of(site, t["bias"], site.bias)[0] if "bias" in roles else t["bias"])
    return len(sites)


def _with_gradient_of(site: Site, folded: fx.Node, base: fx.Node) -> tuple[fx.Node, set[fx.Node]]:
    """``folded + (base - base.detach())``: folded's value, its gradient flowing to ``base``; the
    new node and the nodes that read ``base``."""
    graph = site.graph
    first = site.node if site.kind != "param" else next(n for n in graph.nodes if n in base.users)
    with graph.inserting_before(first):
        detached = call(graph, aten.detach.default, (base,))
        diff = call(graph, aten.sub.Tensor, (base, detached))
        return call(graph, aten.add.Tensor, (folded, diff)), {detached, diff}
