"""Find the linear-like ops of an FX graph and the module (fqn) each belongs to.

Works on graphs from dynamo (torch-level ops, parameters as placeholders or get_attr), from
torch.export (aten ops; ``ep.module()`` with get_attr weights, or the ExportedProgram's own graph
with parameter placeholders) and from ``torch.fx.symbolic_trace`` (call_module nodes, turned into
calls by :func:`inline_leaf_modules` first).

Split by job: :mod:`.nodes` (node metadata, marked calls), :mod:`.sites` (Site and the op forms)
and :mod:`.boundary` (a module's boundary as a site). Their names are re-exported here, so
``from . import graph as g`` stays the one import the rewrite and the passes need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .boundary import find_module_site, module_groups, module_weight
from .nodes import MARK, call, fake_mode_of, module_fqn, named, normalize_path, tensor_meta
from .sites import ADDMM_OPS, CONV_OPS, EMBEDDING_OPS, LINEAR_OPS, Site, aten, make_positional, site_kind

__all__ = [
    "ADDMM_OPS", "BODY_HOPS", "CONV_OPS", "EMBEDDING_OPS", "LINEAR_OPS", "MARK", "Found", "Refused", "Scope", "Site",
    "aten", "call", "fake_mode_of", "find_module_site", "find_sites", "inline_leaf_modules", "module_fqn",
    "module_groups", "module_weight", "named", "normalize_path", "site_kind", "tensor_meta",
]


@dataclass
class Scope:
    """A graph that ops live in: the top graph, or the body of a higher-order op (activation
    checkpointing, ``wrap``, ...) whose placeholders are the op's operands from ``first`` on."""

    gm: fx.GraphModule
    parent: Scope | None = None
    call: fx.Node | None = None
    first: int = 0

    def top(self, node: Any) -> Any:
        """The top-graph node ``node`` stands for (a body placeholder is its call's operand)."""
        scope = self
        while scope.parent is not None and isinstance(node, fx.Node) and node.op == "placeholder":
            index = list(scope.gm.graph.find_nodes(op="placeholder")).index(node)
            node, scope = scope.call.args[scope.first + index], scope.parent
        return node if scope.parent is None else None

    def pass_in(self, outer: fx.Node) -> fx.Node:
        """A body placeholder fed by ``outer`` (a node of the parent graph), appended to the call."""
        graph = self.gm.graph
        last = list(graph.find_nodes(op="placeholder"))[-1]
        with graph.inserting_after(last):
            node = graph.placeholder(f"lora_fx_{outer.name}")
        node.meta[MARK] = True
        for key in ("val", "example_value"):
            if key in outer.meta:
                node.meta[key] = outer.meta[key]
        self.call.args = (*self.call.args, outer)
        return node


# higher-order ops whose body is called once with the operands that follow it: body index, first operand
_hop = torch.ops.higher_order
BODY_HOPS = {_hop.tag_activation_checkpoint: (0, 1), _hop.wrap: (0, 1), _hop.wrap_activation_checkpoint: (0, 1),
             _hop.wrap_with_set_grad_enabled: (1, 2), _hop.wrap_with_autocast: (4, 5)}


@dataclass
class Refused:
    """A linear-like op inside a subgraph lora_fx cannot rewrite (its higher-order op, or a body
    shared by several calls)."""

    node: fx.Node
    path: str | None
    why: str


def _site_path(node: fx.Node, scope: Scope, fallback_paths: dict[fx.Node, str] | None) -> str | None:
    path = module_fqn(node)
    if path is None and fallback_paths:
        top = scope.top(Site(node, "", site_kind(node)).weight)
        p = fallback_paths.get(top)
        path = p.rpartition(".")[0] if p else None
    return path


@dataclass
class Found:
    """What :func:`find_sites` found: the linear-like ops with their module path, the ops with no
    module, the ops in bodies lora_fx cannot rewrite, and the scopes it can rewrite."""

    sites: list[Site]
    unattributed: list[fx.Node]
    refused: list[Refused]
    scopes: list[Scope]


def find_sites(gm: fx.GraphModule, fallback_paths: dict[fx.Node, str] | None = None) -> Found:
    """Every linear-like op and its module path, in the graph and the bodies of its higher-order ops;
    also the ops that could not be attributed, and the ops in bodies lora_fx cannot rewrite.

    The module comes from ``nn_module_stack`` (the module whose forward made the call, which is
    right for tied weights too); without it, from the weight's parameter path in
    ``fallback_paths`` (``layers.0.fc.weight`` -> ``layers.0.fc``). ``Site.fqn`` is left to the caller.
    """
    found = Found([], [], [], [])
    sites, unattributed, refused = found.sites, found.unattributed, found.refused

    def walk(scope: Scope, why: str | None) -> None:
        if why is None:
            found.scopes.append(scope)
        uses: dict[str, int] = {}
        for node in scope.gm.graph.find_nodes(op="get_attr"):
            uses[node.target] = uses.get(node.target, 0) + len(node.users)
        for node in scope.gm.graph.nodes:
            if node.op != "call_function":
                continue
            kind = site_kind(node)
            if kind is not None and not node.meta.get(MARK):
                make_positional(node)
                path = _site_path(node, scope, fallback_paths)
                if why is not None:
                    refused.append(Refused(node, path, why))
                elif path is None:
                    unattributed.append(node)
                else:
                    sites.append(Site(node, "", kind, scope, path))
            bodies = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"
                      and isinstance(getattr(scope.gm, a.target, None), fx.GraphModule)]
            for body in bodies:
                sub = getattr(scope.gm, body.target)
                spec = BODY_HOPS.get(node.target)
                inner_why = why
                if inner_why is None and (spec is None or node.args[spec[0]] is not body):
                    name = getattr(node.target, "__name__", node.target)
                    inner_why = f"inside {name}, which lora_fx does not rewrite"
                elif inner_why is None and uses.get(body.target, 0) > 1:
                    inner_why = f"in a subgraph ({body.target}) that several calls share"
                walk(Scope(sub, scope, node, spec[1] if spec else 0), inner_why)

    walk(Scope(gm), None)
    return found


def inline_leaf_modules(gm: fx.GraphModule) -> int:
    """Turn call_module Linear / Embedding / ConvNd nodes (symbolic_trace) into F.linear /
    F.embedding / F.convNd calls on get_attr weights, so every graph kind has the same op forms.
    Returns the count."""
    count = 0
    convs = {torch.nn.Conv1d: F.conv1d, torch.nn.Conv2d: F.conv2d, torch.nn.Conv3d: F.conv3d}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        conv = convs.get(type(mod)) if getattr(mod, "padding_mode", "zeros") == "zeros" else None
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and conv is None:
            continue
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(f"{node.target}.weight")
            b = gm.graph.get_attr(f"{node.target}.bias") if getattr(mod, "bias", None) is not None else None
            if conv is not None:
                new = gm.graph.call_function(conv, (node.args[0], w, b, mod.stride, mod.padding, mod.dilation,
                                                    mod.groups))
            elif isinstance(mod, torch.nn.Linear):
                new = gm.graph.call_function(F.linear, (node.args[0], w, b))
            else:
                new = gm.graph.call_function(F.embedding, (node.args[0], w, mod.padding_idx, mod.max_norm,
                                                            mod.norm_type, mod.scale_grad_by_freq, mod.sparse))
        new.meta = dict(node.meta)
        new.meta.setdefault("nn_module_stack", {node.target: (node.target, type(mod))})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count
