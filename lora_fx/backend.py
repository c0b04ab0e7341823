"""The torch.compile backend: rewrite each graph dynamo hands over, then call the inner compiler.

    compiled = torch.compile(model, backend=lora_fx.backend(adapter, mode="branch"))

Dynamo calls the backend once per graph (prefill, decode, each recompile). The backend copies the
graph (dynamo reads its own after we return), adds the adapter's tensors as extra placeholders,
compiles with the inner backend and returns a function that appends those tensors to every call.
The tensors are shared by all graphs, so swapping adapters is an in-place copy, never a recompile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx

from .adapter import Adapter
from .inputs import DynamoInputs
from .rewrite import MODES, RewriteReport, rewrite_graph
from .state import LoraState

INNER = ("inductor", "aot_eager", "eager")
FUSE_TOKENS = 16  # Inductor: at most this many static tokens, the branch is fused reductions (CPU fp32:
# faster than two GEMM calls at 1-8 tokens, equal at 32, slower from 64; see benchmarks/)


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


Adapters = Adapter | Sequence[Adapter] | Mapping[str, Adapter | Sequence[Adapter]]


class LoraBackend:
    """A dynamo backend that applies LoRA adapters to every graph it compiles.

    Args:
        adapters: an Adapter or a list of them (summed), or a mapping name -> Adapter (or list)
            for mixed-adapter batches (branch mode; pick each row's adapter with ``select``).
        mode: "branch" or "fold".
        inner: "inductor", "aot_eager", "eager" or a dynamo backend callable.
        max_rank: branch mode's rank budget, the largest total rank ``swap`` accepts later
            (default: the largest rank of ``adapters``).
        inplace: fold mode only: merge into the model's own weights (no second copy in memory);
            the originals are kept on disk and put back bit for bit by ``swap``, ``disable`` and
            ``restore``. The eager model then computes with the adapter too, until ``restore``.
        fuse_tokens: branch mode: graphs whose token count is static and at most this (decode
            steps) get the update as small reductions Inductor fuses into neighbouring kernels,
            instead of two GEMM calls per op (default 16 with inner="inductor", else 0).

    Attributes:
        reports: one RewriteReport per compiled graph.

    Swapping, scaling, disabling and selecting never recompile: they refill, in place, the
    tensors every compiled graph reads.
    """

    def __init__(self, adapters: Adapters, *, mode: str = "branch", inner: str | Callable = "inductor",
                 max_rank: int | None = None, inplace: bool = False, fuse_tokens: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, found {mode!r}")
        if fuse_tokens is not None and (not isinstance(fuse_tokens, int) or fuse_tokens < 0):
            raise ValueError(f"fuse_tokens: expected an int >= 0, found {fuse_tokens!r}")
        self.mode = mode
        self.fuse_tokens = fuse_tokens if fuse_tokens is not None else FUSE_TOKENS if inner == "inductor" else 0
        self.inner = _inner_backend(inner)
        self.state = LoraState(adapters, mode, max_rank, inplace=inplace)
        self.reports: list[RewriteReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        gm = copy_dynamo_graph(gm)
        inputs = DynamoInputs(gm, example_inputs)
        self.reports.append(rewrite_graph(gm, inputs, self.state, self.fuse_tokens))
        extra = tuple(inputs.extra)
        compiled = self.inner(gm, [*example_inputs, *_static_fakes(extra)])

        def run(*args: Any) -> Any:
            return compiled(*args, *extra)

        return run

    def swap(self, adapters: Adapters) -> None:
        """Replace the active adapter(s) in place; the next call equals a fresh compile with them.

        Branch mode copies into the tensors padded to the rank budget; fold mode recomputes
        W' = W + scale * B A in place. A new adapter may target the compiled modules or a subset
        (the others contribute nothing). With a mixed-batch backend, pass a mapping of the slot
        names to replace.

        Raises:
            SwapError: a module the compiled graphs lack, a rank above the budget, DoRA where the
                graph has plain LoRA (or the reverse), a new lora_bias or replaced tensor.
        """
        self.state.swap(adapters)

    def set_scale(self, scale: float) -> None:
        """Multiply every adapter's scale by ``scale`` (0 runs the base model)."""
        self.state.multiplier = float(scale)
        self.state.refill()

    def disable(self) -> None:
        """Run the base model (adapters and replaced tensors off) until ``enable``."""
        self.state.enabled = False
        self.state.refill()

    def enable(self) -> None:
        """Undo ``disable``."""
        self.state.enabled = True
        self.state.refill()

    def restore(self) -> None:
        """In-place fold: put the model's own weights back exactly and turn the adapter off
        (``enable`` merges again). Other modes: the same as ``disable``."""
        self.state.enabled = False
        self.state.refill()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """``with be.disabled(): model(x)`` runs the base model inside the block."""
        was = self.state.enabled
        self.disable()
        try:
            yield
        finally:
            if was:
                self.enable()

    def select(self, rows: Sequence[str | None]) -> None:
        """Mixed batches: row i of the following calls uses adapter ``rows[i]`` (None: the base model).

        With beam search (num_beams = k), give one name per input row: the selection is repeated
        for the k beams of each row, as PEFT's ``adapter_names`` is.

        Raises:
            SwapError: an unknown name, or a backend built without named adapters.
        """
        self.state.select(rows)

    def trained_adapter(self) -> Adapter:
        """The adapter with A and B as they are now (after training); ``.save(dir)`` writes PEFT's format."""
        adapters = self.state.trained_adapters()
        return adapters[0] if len(adapters) == 1 else adapters

    def parameters(self) -> list[torch.nn.Parameter]:
        """Branch mode's A and B tensors: pass them to an optimizer to train the adapter."""
        return self.state.parameters()

    def named_parameters(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """Module fqn -> {"lora_a": (R, in), "lora_b": (out, R)}, padded to the rank budget R.

        Embeddings keep A transposed, (vocab, R). Modules appear once a graph has used them.
        """
        return {fqn: {k: t for k, t in ts.items() if isinstance(t, torch.nn.Parameter)}
                for fqn, ts in self.state.tensors.items() if self.mode == "branch"}


def backend(adapters: Adapters, *, mode: str = "branch", inner: str | Callable = "inductor",
            max_rank: int | None = None, inplace: bool = False, fuse_tokens: int | None = None) -> LoraBackend:
    """A torch.compile backend applying ``adapters``: ``torch.compile(model, backend=backend(a))``.

    See :class:`LoraBackend` for the arguments.
    """
    return LoraBackend(adapters, mode=mode, inner=inner, max_rank=max_rank, inplace=inplace, fuse_tokens=fuse_tokens)
