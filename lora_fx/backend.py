"""The torch.compile backend: rewrite each graph dynamo hands over, then call the inner compiler.

    compiled = torch.compile(model, backend=lora_fx.backend(adapter, mode="branch"))

Dynamo calls the backend once per graph (prefill, decode, each recompile). The backend copies the
graph (dynamo reads its own after we return), rewrites it for every module the backend was built
for, adds the adapter's tensors as extra placeholders, compiles with the inner backend and returns
a function that brings those tensors up to date (``LoraState.check``) and appends them to every
call. Swapping, scaling and disabling change the state, never a graph: no recompile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import graph as g
from . import inplace
from .adapter import Adapter
from .binding import Binder, Owners, base_table, bound_table
from .dynamo import (
    copy_dynamo_graph,
    find_model,
    register_frame,
    static_fakes,
    watch_recompile_limit,
)
from .eager import EagerGuard, any_pending, computed_by_graph
from .errors import GraphRewriteError, LoraFxError, SwapError, raise_if, through_dynamo
from .inplace import merged_by_other, merged_problem
from .inputs import DynamoInputs
from .rewrite import MODES, RewriteReport, Rewritten, rewrite_graph
from .slots import Adapters
from .state import LoraState, resolve, stamp

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
        requantize: fold mode over torchao-quantized weights (opt-in): a torchao config (e.g.
            ``Int8WeightOnlyConfig()``, the one the model was quantized with) that W' =
            dequantize(W) + scale * B A is quantized with again, as PEFT's merge does. W' then
            carries the format's rounding (measured in the README); without it, fold over a
            quantized weight is refused.
        reserve: adapters (or lists / mappings, as ``adapters``) that ``swap`` may bring later
            with other target sets, ranks or variants: the graphs hold the union of their modules
            (the modules an active adapter lacks run the base op with a zero update), so swapping
            between them never recompiles.

    Attributes:
        reports: one RewriteReport per compiled graph.
        lock: held by every compiled call and every change (swap, scale, select, ...): a change
            made from another thread waits for the running graph. With graph breaks, hold it
            around the whole forward (``with be.lock: model(x)``) to make the forward atomic.

    Every graph is rewritten for every module the backend was built with, whatever is active when
    it compiles; swapping, scaling, disabling and selecting never recompile. Before each call a
    compiled graph recomputes the derived tensors it reads (fold's W', DoRA's norms, scales) if a
    setting changed or the base weights they come from were edited in place since.
    """

    def __init__(self, adapters: Adapters, *, mode: str = "branch", inner: str | Callable = "inductor",
                 max_rank: int | None = None, inplace: bool = False, fuse_tokens: int | None = None,
                 reserve: Sequence[Adapters] = (), requantize: Any = None):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, found {mode!r}")
        if fuse_tokens is not None and (not isinstance(fuse_tokens, int) or fuse_tokens < 0):
            raise ValueError(f"fuse_tokens: expected an int >= 0, found {fuse_tokens!r}")
        self.mode = mode
        self.fuse_tokens = fuse_tokens if fuse_tokens is not None else FUSE_TOKENS if inner == "inductor" else 0
        self.inner = _inner_backend(inner)
        self.state = LoraState(adapters, mode, max_rank, inplace=inplace, reserve=reserve, requantize=requantize)
        self.lock = self.state.lock
        self.reports: list[RewriteReport] = []
        self.model: torch.nn.Module | None = None
        self._seen: set[str] = set()
        self._owners: Owners | None = None  # whose weights a graph gets, shared by the graphs (see binding)
        self.eager = EagerGuard(self.state)  # targeted modules run outside the compiled graphs (see eager)
        watch_recompile_limit()

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        """Name the model the adapter applies to (found from the call stack otherwise) and, in
        branch mode, make A and B parameters of their modules (``lora_fx_A`` / ``lora_fx_B``).

        Call it before ``fully_shard``: FSDP2 then shards A and B with their layer and reduces
        their gradients like any parameter; ``be.parameters()`` gives the sharded parameters,
        each compiled call reads the module's current (gathered) tensors, and
        ``trained_adapter()`` gathers the full ones (a collective: call it on every rank). The
        model's ``state_dict`` then holds A and B too.

        Raises:
            GraphRewriteError: the model lacks a module the adapter names; it is already sharded;
                fold mode, mixed batches, DoRA or a grouped conv (see ``LoraState.attach``).
        """
        self.model = model
        self._check_model(model)
        if self.state.mode == "branch":
            with self.lock:
                self.state.attach(model, g.named(model.named_modules()))
        self.eager.install(model, g.named(model.named_modules()))
        return model

    def _check_model(self, model: torch.nn.Module) -> None:
        names = g.named(model.named_modules())
        raise_if([f"{fqn}: expected a linear / Conv1D / embedding op of this module in the graph, found none; "
                  "the model has no module of that name" for fqn in self.state.layout.specs if fqn not in names],
                 GraphRewriteError, "cannot apply the adapter to this model:")

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        try:
            return self._compile(gm, example_inputs)
        except LoraFxError as e:  # as it is, not wrapped in dynamo's BackendCompilerFailed
            raise through_dynamo(e).with_traceback(e.__traceback__) from e.__cause__

    def _compile(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        register_frame()
        gm = copy_dynamo_graph(gm)
        inputs = DynamoInputs(gm, example_inputs)
        model = self.model or find_model(list(self.state.layout.specs))
        if model is not None and self.model is None:
            self._check_model(model)
        if model is not None:
            self.eager.install(model, g.named(model.named_modules()))
        state = self.state
        read = {n for n in gm.graph.find_nodes(op="placeholder") if n.users}
        with state.lock, torch.inference_mode(False):  # the tensors it makes are never inference tensors
            done = rewrite_graph(gm, inputs, state, self.fuse_tokens, model=model, require_all=False)
        self.reports.append(done.report)
        self._seen |= set(done.report.modules) | set(done.report.substituted)
        extra = tuple(inputs.extra)
        trainable = {id(p) for t in state.trainable.values() for p in t.values()} | set(state.sources)
        dropped = _drop_replaced_subclass_inputs(gm, example_inputs, read)
        kept = [x for i, x in enumerate(example_inputs) if i not in dropped]
        compiled = self.inner(gm, [*kept, *static_fakes(extra, trainable)])
        if done.owned and model is not None:
            if self._owners is None or self._owners.model is not model:
                self._owners = Owners(model, state)
            binder = Binder(self._owners, done.owned, example_inputs)
        else:
            binder = None
        repacked = _repackable_modules(model) if model is not None and state.mode == "branch" else []
        return _bind(compiled, extra, state, done, binder, dropped, repacked, self._seen, self.eager)

    def unseen_modules(self) -> list[str]:
        """Targeted modules (and substituted parameters) that no compiled graph has held yet: after
        a forward, these ran outside the compiled graphs (or do not exist) and got no adapter."""
        return sorted((set(self.state.layout.specs) | set(self.state.layout.overrides)) - self._seen)

    def swap(self, adapters: Adapters) -> None:
        """Replace the active adapter(s) in place; the next call equals a fresh compile with them.

        Branch mode writes A and B (padded to the rank budget): trained values are replaced.
        Fold mode recomputes W' = W + scale * B A before the next call. A new adapter may target
        the compiled modules or a subset (the others contribute nothing). With a mixed-batch
        backend, pass a mapping of the slot names to replace.

        Raises:
            SwapError: a module the compiled graphs lack, a rank above the budget, DoRA where the
                graph has plain LoRA (or the reverse), a new lora_bias or replaced tensor.
        """
        with self.lock:
            self.state.update(adapters=adapters)

    def set_scale(self, scale: float) -> None:
        """Multiply every adapter's scale by ``scale`` (0 runs the base model). A and B (trained
        or not) are kept."""
        with self.lock:
            self.state.update(multiplier=scale)

    def disable(self) -> None:
        """Run the base model (adapters and replaced tensors off) until ``enable``; A and B are kept."""
        with self.lock:
            self.state.update(enabled=False)

    def enable(self) -> None:
        """Undo ``disable``."""
        with self.lock:
            self.state.update(enabled=True)

    def refresh(self) -> None:
        """Take the model's weights as they are now. Call it after writing them where PyTorch's
        version counters cannot see (``p.data.copy_(new)``, as diffusers' ``EMAModel.copy_to``
        does; any other edit is noticed by itself): fold's W' and DoRA's norms are recomputed
        before the next call, and in place, a weight that no longer holds lora_fx's merge is
        taken as the new base and merged again (one that still holds it is left as it is)."""
        with self.lock:
            self.state.rebase()

    def restore(self) -> None:
        """Turn the adapter off. In-place fold: put the model's own weights back exactly (the
        copies saved when they were merged), also after a refused outside change; after it, the
        merge waits for the next compiled call, which merges into the weights the model then
        holds (tensors that replaced the merged ones included)."""
        with self.lock:
            self.state.update(enabled=False, restoring=True)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """``with be.disabled(): model(x)`` runs the base model inside the block (a reference pass
        during training keeps the trained A and B)."""
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
        for the k beams of each row, as PEFT's ``adapter_names`` is. A call whose batch is not a
        multiple of ``len(rows)`` raises SwapError.

        Raises:
            SwapError: an unknown name, or a backend built without named adapters.
        """
        if self.state.selection is None:
            raise SwapError("select: expected a backend built with a mapping name -> adapter, found one adapter set")
        with self.lock:
            self.state.selection.select(rows)

    def trained_adapter(self) -> Adapter | list[Adapter]:
        """The adapter with A and B as they are now (after training); ``.save(dir)`` writes PEFT's format."""
        adapters = self.state.trained_adapters()
        return adapters[0] if len(adapters) == 1 else adapters

    def parameters(self) -> list[torch.nn.Parameter]:
        """Branch mode's A and B: pass them to an optimizer to train the adapter. Asking for them
        turns their gradients on (until then a forward outside ``no_grad`` builds no autograd
        graph for them)."""
        return self.state.parameters()

    def named_parameters(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """Module fqn -> {"lora_a": (R, in), "lora_b": (out, R)}, padded to the rank budget R.

        Embeddings keep A transposed, (vocab, R). Turns their gradients on, as ``parameters``.
        """
        self.state.parameters()
        return {fqn: dict(t) for fqn, t in self.state.trainable.items()}


def _drop_replaced_subclass_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any], read: set) -> set[int]:
    """Remove the graph's inputs that the rewrite left unread and that are tensor subclasses (a
    quantized weight a requantized W' replaced): AOTAutograd would unwrap each at every call for
    nothing. Returns their positions, which the call then leaves out."""
    dropped = set()
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        if i < len(example_inputs) and node in read and not node.users \
                and is_traceable_wrapper_subclass(example_inputs[i]):
            gm.graph.erase_node(node)
            dropped.add(i)
    if dropped:
        gm.recompile()
    return dropped


def _repackable_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """bitsandbytes 4-bit modules (see :func:`_refuse_training_repacked`)."""
    return [(fqn, m) for fqn, m in g.named(model.named_modules()).items()
            if type(getattr(m, "weight", None)).__name__ == "Params4bit"]


def _refuse_training_repacked(modules: Sequence[tuple[str, torch.nn.Module]]) -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU kernel at the first inference call; its
    training path then reads the repacked weight wrongly (with PEFT itself on a tiny NF4 Llama:
    the loss 3.1e-3 and an A gradient 6.9e-3 of 6.4e-2 off the fp32 computation, against 0.0 on a
    weight never repacked). Until bitsandbytes reads it right, training through one is refused."""
    raise_if([f"{fqn}: its bitsandbytes 4-bit weight was repacked for the CPU inference kernel (at the first call "
              "without gradients), and bitsandbytes' training path reads a repacked weight wrongly (gradients about "
              "10% off)" for fqn, m in modules
              if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)],
             GraphRewriteError, "cannot train through this graph: train before the first inference call, or load the "
                                "model again (inference through it is unaffected):")


def _bind(compiled: Callable, extra: tuple, state: LoraState, done: Rewritten, binder: Binder | None,
          dropped: set[int] = frozenset(), repacked: Sequence[tuple[str, torch.nn.Module]] = (),
          seen: set[str] | None = None, eager: EagerGuard | None = None) -> Callable:
    """The function dynamo calls for one graph: bind the modules whose weights it gets (see
    :mod:`lora_fx.binding`), bring what it reads up to date, then run it.

    ``extra`` are the tensors appended to every call: those of a derived set are looked up again
    whenever a set was recomputed (into new tensors), A / B and the selection are passed as they
    are, attached A / B are read from their module (FSDP2 swaps its sharded and gathered forms).
    ``done.no_backward``: modules traced without a backward (``rewrite._traced_without_gradient``),
    ``repacked``: bitsandbytes 4-bit modules: a call that would train through them raises.
    ``dropped``: positions of the call's arguments the compiled graph no longer takes. ``seen``:
    the modules the backend's graphs have held, bound ones added.
    """
    seen = set() if seen is None else seen
    derived, no_backward = done.derived, done.no_backward
    tables = {(): base_table(state, extra, derived)}
    device = state.device
    # one stamp over every watched base tensor: while it and the state's changes are as they were
    # after a table's last full check, no derived set it reads can be stale (in place excluded:
    # its check also reads the weights it wrote)
    quick = not state.inplace
    replaced = [(d.key, refs[0]) for d, refs in derived if d.kind == "override"]  # modules_to_save, saved biases
    bases = [(d.key, refs) for d, refs in derived if d.kind != "override"]
    merges = [inplace.EPOCH[0]]  # in-place folds made anywhere: checked again after a new one

    def refuse_merged(args: Sequence[Any]) -> None:
        raise_if([merged_problem(fqn, what, holder) for fqn, refs in bases
                  for what, t in zip(("weight", "bias"), resolve(refs, args))
                  if (holder := merged_by_other(t, state)) is not None],
                 GraphRewriteError, "cannot apply the adapter to this graph:")
        merges[0] = inplace.EPOCH[0]

    def run(*args: Any) -> Any:
        if (no_backward or replaced or repacked) and torch.is_grad_enabled() and any(p.requires_grad for p in extra):
            if no_backward:
                _refuse_training(no_backward)
            _refuse_training_repacked(repacked)
            _refuse_training_replaced([key for key, ref in replaced if resolve((ref,), args)[0].requires_grad])
        with state.lock:
            if merges[0] != inplace.EPOCH[0]:
                refuse_merged(args)
            pairs = binder.pairs(args) if binder is not None else ()
            table = tables.get(pairs)
            if table is None:
                table = tables[pairs] = bound_table(state, tables[()], extra, derived, done.added, pairs, args)
                seen.update(y for _, y in pairs)
            stale = table.seen[0] != state.generation
            now = stamp([t for d, refs in table.watched for t in (*resolve(refs, args), *d.also)]) \
                if quick and table.watched else None
            if not quick or stale or now != table.checked[0] or table.checked[1] != state.changes:
                state.check([(d, resolve(refs, args)) for d, refs in (table.derived if stale else table.watched)])
                table.checked = [now, state.changes]
            if stale or table.seen[1] != state.changes:
                table.rebuild()
                table.seen = [state.generation, state.changes]
            if device is not None and state.device != device:  # the model moved back and forth
                state.place(device)
            if done.batch is not None and state.selection is not None:
                _check_batch(done.batch, args, state.selection.count)
            tensors = table.tensors(args)
            if eager is not None and any_pending():  # a module runs eagerly around this graph (its forward compiled)
                computed_by_graph(eager.modules(table.modules))
            if dropped:
                args = [a for i, a in enumerate(args) if i not in dropped]
            return compiled(*args, *tensors)

    return run


def _refuse_training(fqns: Sequence[str]) -> None:
    raise GraphRewriteError(
        [f"{fqn}: its quantized kernel was traced for an input that needs no gradient (the model is frozen), "
         "so the compiled graph has no backward through it" for fqn in fqns],
        header="cannot train through this graph: the gradients of A / B before these modules would be wrong. "
               "Call model.enable_input_require_grads() before the first compiled call (as PEFT's "
               "prepare_model_for_kbit_training does), or run inference under torch.no_grad():")


def _refuse_training_replaced(paths: Sequence[str]) -> None:
    raise_if([f"{path}: the adapter's tensor (modules_to_save, or a saved bias) replaces this parameter in the "
              "graph, and lora_fx trains only A and B, so neither it nor the model's own parameter would learn "
              "(PEFT trains its copy)" for path in paths], GraphRewriteError,
             "cannot train through this graph: freeze these parameters (requires_grad_(False)) to train A and B "
             "alone, or train this adapter with PEFT:")


def _check_batch(batch: Any, args: Sequence[Any], rows: int) -> None:
    size = batch if isinstance(batch, int) else args[batch[1]].shape[0] if batch[0] == "shape" else args[batch[1]]
    if size % rows:
        raise SwapError(f"mixed batch: expected a batch of a multiple of the {rows} selected rows "
                        f"(one name per row; beams repeat it), found {size} rows; call select() with one "
                        "name per row of this batch")


def backend(adapters: Adapters, *, mode: str = "branch", inner: str | Callable = "inductor",
            max_rank: int | None = None, inplace: bool = False, fuse_tokens: int | None = None,
            reserve: Sequence[Adapters] = (), requantize: Any = None) -> LoraBackend:
    """A torch.compile backend applying ``adapters``: ``torch.compile(model, backend=backend(a))``.

    See :class:`LoraBackend` for the arguments.
    """
    return LoraBackend(adapters, mode=mode, inner=inner, max_rank=max_rank, inplace=inplace, fuse_tokens=fuse_tokens,
                       reserve=reserve, requantize=requantize)
