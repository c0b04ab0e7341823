"""Fold pass: the base op reads W' = W + scale * B A (and b' for lora_bias) instead of W.

W' is computed once, outside the graph; the compiled code is the base model's with W' in place of
W, so it costs exactly what the base model costs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from ..graph import Site


def fold_lora_weights(sites: list[Site], tensors: Callable[[Site], dict[str, fx.Node]]) -> int:
    """Point every site's weight (and bias, when folded) at the merged tensors."""
    for site in sites:
        t = tensors(site)
        if "weight" in t:  # folded into the model's own weight (in place): nothing to point at
            site.set_weight(t["weight"])
            if site.kind == "conv" and site.conv_args()["groups"] != 1:
                site.set_conv_groups(1)  # a grouped conv's W' is dense (see tensors.fold_tensors)
        if "bias" in t:
            site.set_bias(t["bias"])
    return len(sites)
