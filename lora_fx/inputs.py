"""How tensors enter a graph: the real value of a graph input, and adding new ones.

- ``DynamoInputs``: a dynamo backend's graph. Parameters are placeholders whose real values are
  ``example_inputs`` (or get_attr under freezing); new tensors become extra placeholders that the
  backend appends to every call.
- ``ModuleInputs``: a GraphModule (symbolic_trace, ``ep.module()``). New tensors are registered
  on a ``lora_fx`` submodule and read with get_attr.
- ``ExportInputs``: an ExportedProgram's graph. New tensors are parameter / buffer placeholders
  recorded in the graph signature.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

from .graph import MARK, fake_mode_of, normalize_path, tensor_meta
from .tensors import address

HOLDER = "lora_fx"


def _fake_mode(graph: fx.Graph) -> Any:
    return fake_mode_of(tensor_meta(n) for n in graph.nodes)


def _attr_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


class GraphInputs:
    """Base: real values and parameter paths of a graph's inputs, and a way to add tensors."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.values: dict[fx.Node, torch.Tensor] = {}
        self.paths: dict[fx.Node, str] = {}
        self.fake_mode = _fake_mode(gm.graph)
        self._added: dict[int, fx.Node] = {}
        for node in gm.graph.find_nodes(op="get_attr"):
            try:
                value = _fetch(gm, node.target)
            except AttributeError:
                continue
            if isinstance(value, torch.Tensor):
                self.values[node] = value
                self.paths[node] = node.target

    def value(self, node: Any) -> torch.Tensor | None:
        return self.values.get(node) if isinstance(node, fx.Node) else None

    def node_for_path(self, path: str) -> fx.Node | None:
        return next((n for n, p in self.paths.items() if p == path), None)

    def node_for_tensor(self, t: torch.Tensor) -> fx.Node | None:
        """The graph input that holds ``t`` (same storage and shape)."""
        return next((n for n, v in self.values.items() if not n.meta.get(MARK)
                     and address(v) == address(t) and v.shape == t.shape), None)

    def ref(self, node: fx.Node | None) -> Any:
        """Where a call finds ``node``'s tensor: its value (a graph that is not called with it)."""
        return self.value(node)

    def batch_ref(self, dim: Any) -> Any:
        """Where a call's batch size ``dim`` is read: the int itself when static."""
        return dim if isinstance(dim, int) else None

    def add(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """A node for ``tensor`` (one per tensor object, however often it is asked for)."""
        node = self._added.get(id(tensor))
        if node is None:
            node = self._make(name, tensor)
            node.meta[MARK] = True
            if self.fake_mode is not None:
                node.meta["val"] = node.meta["example_value"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
            self.values[node] = tensor
            self._added[id(tensor)] = node
        return node

    def _make(self, name: str, tensor: torch.Tensor) -> fx.Node:
        raise NotImplementedError


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class DynamoInputs(GraphInputs):
    """A dynamo graph: placeholders line up with ``example_inputs``; new tensors are appended."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any]):
        super().__init__(gm)
        # No fake values on what we add: the graph's fake mode is dynamo's tracing mode, and
        # fakifying new tensors there registers them with its ShapeEnv, which then fails to
        # produce guards. AOTAutograd re-traces everything with real example inputs anyway.
        self.fake_mode = None
        self.extra: list[torch.Tensor] = []
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self._positions = {node: i for i, node in enumerate(placeholders)}
        self._last = placeholders[-1] if placeholders else None
        for node, value in zip(placeholders, example_inputs):
            if isinstance(value, torch.Tensor):
                self.values[node] = value
            grapharg = node.meta.get("grapharg")
            source = getattr(grapharg, "source", None) or getattr(node, "_dynamo_source", None)
            if source is not None:
                self.paths[node] = normalize_path(source.name)
        sources = getattr(gm, "_param_name_to_source", None) or {}
        for node in gm.graph.find_nodes(op="get_attr"):
            if node.target in sources:
                self.paths[node] = normalize_path(sources[node.target].name)

    def ref(self, node: fx.Node | None) -> Any:
        """A placeholder's position in the call's arguments (its tensor may change between calls)."""
        return self._positions[node] if node in self._positions else self.value(node)

    def batch_ref(self, dim: Any) -> Any:
        """The static batch size, or ("shape" | "int", position) of the input that carries it."""
        if isinstance(dim, int):
            return dim
        expr = getattr(getattr(dim, "node", None), "expr", None)
        for node, i in self._positions.items():
            val = node.meta.get("example_value")
            if isinstance(val, torch.Tensor) and val.dim() and getattr(val.shape[0], "node", None) is not None \
                    and val.shape[0].node.expr == expr:
                return ("shape", i)
            if isinstance(val, torch.SymInt) and val.node.expr == expr:
                return ("int", i)
        return None

    def _make(self, name: str, tensor: torch.Tensor) -> fx.Node:
        graph = self.gm.graph
        if self._last is None:
            with graph.inserting_before(next(iter(graph.nodes))):
                node = graph.placeholder(_attr_name(name))
        else:
            with graph.inserting_after(self._last):
                node = graph.placeholder(_attr_name(name))
        node._dynamo_source = None  # read by AOTAutograd for every placeholder
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        self._last = node
        self.extra.append(tensor)
        return node


class ModuleInputs(GraphInputs):
    """A plain GraphModule: new tensors live on its ``lora_fx`` submodule, read with get_attr."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        if not hasattr(gm, HOLDER):
            gm.add_submodule(HOLDER, torch.nn.Module())
        self.holder = getattr(gm, HOLDER)

    def _make(self, name: str, tensor: torch.Tensor) -> fx.Node:
        attr, i = _attr_name(name), 0
        while hasattr(self.holder, attr):
            i += 1
            attr = f"{_attr_name(name)}_{i}"
        if isinstance(tensor, torch.nn.Parameter):
            self.holder.register_parameter(attr, tensor)
        else:
            self.holder.register_buffer(attr, tensor)
        first = next(n for n in self.gm.graph.nodes if n.op != "placeholder")
        with self.gm.graph.inserting_before(first):
            return self.gm.graph.get_attr(f"{HOLDER}.{attr}")


class ExportInputs(GraphInputs):
    """An ExportedProgram's graph: parameters are placeholders named in the graph signature."""

    def __init__(self, ep: Any, gm: fx.GraphModule):
        super().__init__(gm)
        self.ep = ep
        self.new_specs: list[tuple[fx.Node, str, torch.Tensor]] = []
        sig = ep.graph_signature
        by_name = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
        for name, target in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items():
            node = by_name[name]
            self.paths[node] = target
            self.values[node] = ep.state_dict[target] if target in ep.state_dict else ep.constants[target]
        user = set(sig.user_inputs)
        self._first_user = next((n for n in gm.graph.find_nodes(op="placeholder") if n.name in user), None)

    def _make(self, name: str, tensor: torch.Tensor) -> fx.Node:
        graph = self.gm.graph
        anchor = self._first_user or next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(anchor):
            node = graph.placeholder(_attr_name(name))
        self.new_specs.append((node, f"{HOLDER}.{_attr_name(name)}", tensor))
        return node
