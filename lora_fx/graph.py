"""Find the linear-like ops of an FX graph and the module (fqn) each belongs to.

Works on graphs from dynamo (torch-level ops, parameters as placeholders or get_attr), from
torch.export (aten ops; ``ep.module()`` with get_attr weights, or the ExportedProgram's own graph
with parameter placeholders) and from ``torch.fx.symbolic_trace`` (call_module nodes, turned into
calls by :func:`inline_leaf_modules` first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

aten = torch.ops.aten
LINEAR_OPS = (F.linear, torch._C._nn.linear, aten.linear.default)
ADDMM_OPS = (torch.addmm, aten.addmm.default)
EMBEDDING_OPS = (F.embedding, aten.embedding.default)
# convolutions: (x, weight, bias, stride, padding, dilation, groups); aten.convolution has
# (x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
CONV_OPS = (torch.conv1d, torch.conv2d, torch.conv3d, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
            aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default)
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


@dataclass
class Site:
    """One linear-like op in a graph, attributed to a module.

    kind: "linear" (y = x W^T + b, W (out, in)), "conv1d" (addmm(b, x2d, W), W (in, out)),
    "embedding" (y = W[x], W (vocab, dim)), "conv" (a convolution, W (out, in / groups, *k)),
    "param" (``node`` is a parameter (out, in) itself, read by whatever ops use it), or
    "module": a module whose forward is a linear map
    of its input computed by some other op (a quantized weight's kernel); ``node`` is then the
    module's output and ``input`` its input (see :func:`find_module_site`). ``path``: the module
    path the graph's metadata gives (relative to the traced frame's root); ``fqn``: the adapter's
    module name.
    """

    node: fx.Node
    fqn: str
    kind: str
    scope: Scope | None = None
    path: str = ""
    input: fx.Node | None = None  # "module" sites: the module's input
    weight_input: fx.Node | None = None  # "module" sites: the module's weight as the graph reads it

    @property
    def graph(self) -> fx.Graph:
        return self.node.graph

    @property
    def _is_aten_embedding(self) -> bool:
        return self.node.target is aten.embedding.default

    @property
    def x(self) -> fx.Node | None:
        if self.kind == "param":
            return None
        if self.kind == "module":
            return self.input
        if self.kind == "conv1d" or self._is_aten_embedding:
            return self.node.args[1]
        return self.node.args[0]

    @property
    def weight(self) -> fx.Node | None:
        if self.kind == "param":
            return self.node
        if self.kind == "module":
            return self.weight_input
        if self.kind == "conv1d":
            return self.node.args[2]
        return self.node.args[0] if self._is_aten_embedding else self.node.args[1]

    @property
    def bias(self) -> fx.Node | None:
        if self.kind in ("module", "param"):
            return None
        if self.kind == "conv1d":
            return self.node.args[0]
        if self.kind == "embedding":
            return None
        return self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs.get("bias")

    def embedding_args(self) -> dict[str, Any]:
        """An embedding site's padding_idx (-1: none, as aten.embedding takes it), max_norm and
        scale_grad_by_freq, as its op holds them."""
        args, kw = self.node.args, self.node.kwargs
        if self._is_aten_embedding:  # (weight, indices, padding_idx, scale_grad_by_freq, sparse)
            pad = args[2] if len(args) > 2 else kw.get("padding_idx", -1)
            return {"padding_idx": pad, "max_norm": None,
                    "scale_grad_by_freq": args[3] if len(args) > 3 else kw.get("scale_grad_by_freq", False)}
        # F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
        pad = args[2] if len(args) > 2 else kw.get("padding_idx")
        if pad is not None and pad < 0:  # F.embedding counts a negative index from the end
            meta = tensor_meta(self.weight)
            pad = pad + meta.shape[0] if meta is not None else pad
        return {"padding_idx": -1 if pad is None else pad,
                "max_norm": args[3] if len(args) > 3 else kw.get("max_norm"),
                "scale_grad_by_freq": args[5] if len(args) > 5 else kw.get("scale_grad_by_freq", False)}

    def set_weight(self, new: fx.Node) -> None:
        if self.kind == "param":  # every op that reads the parameter reads ``new``
            self.node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
            return
        idx = 2 if self.kind == "conv1d" else 0 if self._is_aten_embedding else 1
        self.node.update_arg(idx, new)

    def set_bias(self, new: fx.Node) -> None:
        assert self.kind != "embedding"
        if self.kind == "conv1d" or len(self.node.args) > 2:
            self.node.update_arg(0 if self.kind == "conv1d" else 2, new)
        elif "bias" in self.node.kwargs:
            self.node.update_kwarg("bias", new)
        else:
            self.node.args = (*self.node.args[:2], new)

    def conv_args(self) -> dict[str, Any]:
        """A conv site's stride, padding, dilation and groups as its op holds them."""
        node, aten_conv = self.node, self.node.target is aten.convolution.default
        names = ("stride", "padding", "dilation", "transposed", "output_padding", "groups") if aten_conv \
            else ("stride", "padding", "dilation", "groups")
        meta = tensor_meta(self.weight)
        dims = meta.dim() - 2 if meta is not None else int(str(getattr(node.target, "__name__", node.target))[4])
        defaults = {"stride": [1] * dims, "padding": [0] * dims, "dilation": [1] * dims, "groups": 1,
                    "transposed": False}
        return {name: node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(name, defaults.get(name))
                for i, name in enumerate(names)}

    def set_conv_groups(self, groups: int) -> None:
        """Set a conv site's groups argument."""
        idx = 8 if self.node.target is aten.convolution.default else 6
        if len(self.node.args) > idx:
            self.node.update_arg(idx, groups)
        else:
            self.node.update_kwarg("groups", groups)

    def conv_call(self, graph: fx.Graph, x: fx.Node, weight: fx.Node, bias: fx.Node | None, *,
                  stride: Any, padding: Any, dims: int) -> fx.Node:
        """A convolution of the site's op form (dilation 1, groups 1), marked as lora_fx's."""
        ones = [1] * dims
        if self.node.target is aten.convolution.default:
            args = (x, weight, bias, stride, padding, ones, False, [0] * dims, 1)
        else:
            args = (x, weight, bias, stride, padding, ones, 1)
        return call(graph, self.node.target, args)


def site_kind(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    if node.target in LINEAR_OPS:
        return "linear"
    if node.target in ADDMM_OPS:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        return "conv1d"
    if node.target in EMBEDDING_OPS:
        return "embedding"
    if node.target in CONV_OPS:
        transposed = node.target is aten.convolution.default and len(node.args) > 6 and node.args[6]
        return None if transposed else "conv"
    return None


def _positional(node: fx.Node) -> None:
    """Move a site op's operands passed by keyword (``F.linear(x, weight=w)``) into its positional
    args, where :class:`Site` reads them."""
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments if not a.kwarg_only] if schema is not None else {
        F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
        torch.addmm: ("input", "mat1", "mat2")}.get(node.target, ("input", "weight", "bias", "stride", "padding",
                                                                   "dilation", "groups"))  # linear, conv
    args, kwargs = list(node.args), dict(node.kwargs)
    for name in names[len(args):]:
        if name not in kwargs:
            break
        args.append(kwargs.pop(name))
    if len(args) > len(node.args):
        node.args, node.kwargs = tuple(args), kwargs


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
                _positional(node)
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
