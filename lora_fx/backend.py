"""The torch.compile backend: rewrite each graph dynamo hands over, then call the inner compiler.

    compiled = torch.compile(model, backend=lora_fx.backend(adapter, mode="branch"))

Dynamo calls the backend once per graph (prefill, decode, each recompile). The backend copies the
graph (dynamo reads its own after we return), adds the adapter's tensors as extra placeholders,
compiles with the inner backend and returns a function that appends those tensors to every call.
The tensors are shared by all graphs, so swapping adapters is an in-place copy, never a recompile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from .adapter import Adapter, as_adapters
from .inputs import DynamoInputs
from .rewrite import MODES, RewriteReport, rewrite_graph
from .state import LoraState

INNER = ("inductor", "aot_eager", "eager")


def _inner_backend(inner: str | Callable) -> Callable:
    if callable(inner):
        return inner
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    if inner not in INNER:
        raise ValueError(f"inner: expected one of {INNER} or a dynamo backend callable, found {inner!r}")
    from torch._dynamo import lookup_backend

    return lookup_backend(inner)


def copy_dynamo_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of dynamo's GraphModule that can be changed without touching dynamo's own."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, value_map))
    for old, new in value_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    new_gm = fx.GraphModule(gm, graph)
    new_gm.meta = dict(gm.meta)
    for attr in ("_param_name_to_source",):
        if hasattr(gm, attr):
            setattr(new_gm, attr, getattr(gm, attr))
    return new_gm


def _static_fakes(tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Our tensors as fake tensors of static shape in the backend's fake mode.

    Real tensors that dynamo did not see would be fakified by AOTAutograd with fresh symbolic
    sizes that have no source, and dynamo then fails to build its shape guards.
    """
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    mode = getattr(ctx, "fake_mode", None)
    if mode is None:
        return list(tensors)
    return [mode.from_tensor(t, static_shapes=True) for t in tensors]


class LoraBackend:
    """A dynamo backend that applies LoRA adapters to every graph it compiles.

    Args:
        adapters: an Adapter or a list of them (summed).
        mode: "branch" or "fold".
        inner: "inductor", "aot_eager", "eager" or a dynamo backend callable.
        max_rank: branch mode's rank budget (default: the largest rank seen).

    Attributes:
        reports: one RewriteReport per compiled graph.
    """

    def __init__(self, adapters: Adapter | Sequence[Adapter], *, mode: str = "branch",
                 inner: str | Callable = "inductor", max_rank: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, found {mode!r}")
        self.mode = mode
        self.inner = _inner_backend(inner)
        self.state = LoraState(as_adapters(adapters), mode, max_rank)
        self.reports: list[RewriteReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        gm = copy_dynamo_graph(gm)
        inputs = DynamoInputs(gm, example_inputs)
        self.reports.append(rewrite_graph(gm, inputs, self.state))
        extra = tuple(inputs.extra)
        compiled = self.inner(gm, [*example_inputs, *_static_fakes(extra)])

        def run(*args: Any) -> Any:
            return compiled(*args, *extra)

        return run

    def parameters(self) -> list[torch.nn.Parameter]:
        """Branch mode's A and B tensors: pass them to an optimizer to train the adapter."""
        return self.state.parameters()

    def named_parameters(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """Module fqn -> {"lora_a": (R, in), "lora_b": (out, R)}, padded to the rank budget R.

        Embeddings keep A transposed, (vocab, R). Modules appear once a graph has used them.
        """
        return {fqn: {k: t for k, t in ts.items() if isinstance(t, torch.nn.Parameter)}
                for fqn, ts in self.state.tensors.items() if self.mode == "branch"}


def backend(adapters: Adapter | Sequence[Adapter], *, mode: str = "branch", inner: str | Callable = "inductor",
            max_rank: int | None = None) -> LoraBackend:
    """A torch.compile backend applying ``adapters``: ``torch.compile(model, backend=backend(a))``."""
    return LoraBackend(adapters, mode=mode, inner=inner, max_rank=max_rank)
