"""Small facts about FX nodes that the graph walks and the passes share: the module path a node's
dynamo / export metadata gives, the fake tensor a node stands for, and adding a call node marked as
lora_fx's (with its fake value).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

MARK = "lora_fx"  # node.meta key set on every node a pass adds, and on the graph once rewritten

_ROOT = re.compile(r"^(?:[LG]\[[^\]]*\])(?:\[[^\]]*\])*")


def normalize_path(path: str) -> str:
    """A dotted module / parameter path from a dynamo source or nn_module_stack string.

    ``L['self']._modules['layers']._modules['0']._parameters['weight']`` -> ``layers.0.weight``;
    ``L['args'][0].model.layers[0].mlp`` -> ``model.layers.0.mlp``; ``G['f'].__self__.embed_tokens``
    (a module reached through a bound method) -> ``embed_tokens``, a suffix of its fqn; export paths pass
    through.
    """
    path = _ROOT.sub("", path)
    path = path.rpartition("__self__.")[2]  # a module reached through a bound method (a patched forward)
    path = re.sub(r"\._(?:modules|parameters|buffers)\[", "[", path)
    path = re.sub(r"\[['\"]([^'\"]*)['\"]\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.strip(".")


def named(items: Any) -> dict[str, Any]:
    """``named_modules`` / ``named_parameters`` items with torch.compile wrappers' ``_orig_mod.``
    left out of the names, so a model whose submodule was compiled keeps the names an adapter uses."""
    return {name.replace("_orig_mod.", "").removesuffix("._orig_mod"): v for name, v in items}


def module_fqn(node: fx.Node) -> str | None:
    """The path of the module whose forward emitted ``node`` (None without module metadata)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _type = list(stack.values())[-1]
    return normalize_path(path)


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The fake (or real) tensor an FX node stands for, when the graph carries one."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    return val if isinstance(val, torch.Tensor) else None


def fake_mode_of(values: Any) -> Any:
    """The fake mode of the first fake tensor among ``values`` (the graph's own mode; inside a
    backend the tracing context holds a different one, so detect_fake_mode would mislead)."""
    return next((v.fake_mode for v in values if hasattr(v, "fake_mode")), None)


def call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """Add a call_function node (marked as lora_fx's) with its fake value, when inputs have one."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    node.meta[MARK] = True

    def val(n: fx.Node) -> Any:
        return n.meta.get("val", n.meta.get("example_value"))

    if node.all_input_nodes and all(val(n) is not None for n in node.all_input_nodes):
        vargs, vkwargs = fx.node.map_arg((args, kwargs), val)
        mode = fake_mode_of(torch.utils._pytree.tree_leaves((vargs, vkwargs)))
        if mode is not None:
            with mode:
                node.meta["val"] = node.meta["example_value"] = target(*vargs, **vkwargs)
    return node
