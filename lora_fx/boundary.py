"""The boundary of a module whose forward is a linear map computed by ops lora_fx does not know (a
quantized weight's kernel, a custom autograd function): the nodes each module's forward emitted, the
module's weight among what they read, and the one input and output that make a "module" Site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from .nodes import MARK, module_fqn, tensor_meta
from .sites import Site

if TYPE_CHECKING:
    from .graph import Scope


def module_groups(scopes: list[Scope]) -> dict[str, list[tuple[Scope, list[fx.Node]]]]:
    """Module path -> the scopes with the nodes its forward emitted there (``nn_module_stack``)."""
    out: dict[str, list[tuple[Scope, list[fx.Node]]]] = {}
    for scope in scopes:
        groups: dict[str, list[fx.Node]] = {}
        for node in scope.gm.graph.nodes:
            path = module_fqn(node) if node.op in ("call_function", "call_method", "call_module") else None
            if path is not None and not node.meta.get(MARK):
                groups.setdefault(path, []).append(node)
        for path, nodes in groups.items():
            out.setdefault(path, []).append((scope, nodes))
    return out


def module_weight(scope: Scope, path: str, nodes: list[fx.Node], param_paths: dict[fx.Node, str]) -> fx.Node | None:
    """The graph input that is the weight of module ``path`` among what ``nodes`` read (None if none)."""
    want = f"{path}.weight" if path else "weight"
    return next((a for n in nodes for a in n.all_input_nodes if param_paths.get(scope.top(a)) == want), None)


def find_module_site(scope: Scope, path: str, nodes: list[fx.Node], shape: tuple[int, int],
                     param_paths: dict[fx.Node, str], weight: fx.Node | None) -> Site | str:
    """A module whose forward is a linear map of its input, whatever ops compute it (a bitsandbytes
    4-bit kernel, a custom autograd function): its boundary in the graph.

    ``nodes`` are the ops the module's forward emitted (one call of it). The input is the one
    tensor they read from outside whose last dim is ``in`` and which is not the module's own state
    (a tensor whose parameter path lies under ``path``: weight, quantization constants); the output
    is the one tensor of last dim ``out``, computed from the input, that ops outside the module
    read (state the forward updates on the side, e.g. repacked quantization constants, is not).
    ``weight``: the module's weight node (:func:`module_weight`). Returns the site, or the
    problem (a string) when either is not unique.
    """
    out_f, in_f = shape
    inside = set(nodes)
    prefix = f"{path}." if path else ""

    def own(node: fx.Node) -> bool:
        p = param_paths.get(scope.top(node))
        return p is not None and p.startswith(prefix)

    def width(node: fx.Node) -> int | None:
        meta = tensor_meta(node)
        if meta is None or meta.dim() < 1:
            return None
        d = meta.shape[-1]  # a size computed from data (an unbacked SymInt) is nobody's width: no guard on it
        return d if isinstance(d, int) or not free_unbacked_symbols(d) else None

    xs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes
                            if a not in inside and not own(a) and width(a) == in_f))
    reach = set(xs)  # what the input flows into inside the module (not state it updates on the side)
    for n in nodes:
        if any(a in reach for a in n.all_input_nodes):
            reach.add(n)
    ys = [n for n in nodes if n in reach and width(n) == out_f and any(u not in inside for u in n.users)]
    if len(xs) != 1 or len(ys) != 1:
        return (f"expected one input of width {in_f} and one output of width {out_f} at the module's boundary "
                f"in the graph, found inputs {[a.name for a in xs]} and outputs {[n.name for n in ys]}")
    return Site(ys[0], "", "module", scope, path, input=xs[0], weight_input=weight)
