"""Site: one linear-like op of an FX graph and its operands, read and replaced where the op's own
argument layout holds them (linear, Conv1D's addmm, embedding and convolution, in torch and aten
forms); :func:`site_kind` says which ops are sites.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx

from .nodes import call, tensor_meta

if TYPE_CHECKING:
    from .graph import Scope

aten = torch.ops.aten
LINEAR_OPS = (F.linear, torch._C._nn.linear, aten.linear.default)
ADDMM_OPS = (torch.addmm, aten.addmm.default)
EMBEDDING_OPS = (F.embedding, aten.embedding.default)
# convolutions: (x, weight, bias, stride, padding, dilation, groups); aten.convolution has
# (x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
CONV_OPS = (torch.conv1d, torch.conv2d, torch.conv3d, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
            aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default)


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

    def set_weight(self, new: fx.Node, keep: Collection[fx.Node] = ()) -> None:
        """The op reads ``new`` as its weight; "param": every op that reads the parameter does,
        but ``new`` and ``keep`` (nodes that compute ``new`` from it)."""
        if self.kind == "param":
            self.node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and user not in keep)
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


def make_positional(node: fx.Node) -> None:
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
