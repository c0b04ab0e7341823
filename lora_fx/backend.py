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
from .adapter import Adapter
from .binding import Binder, Owners
from .call import _repackable_modules, bind
from .checks import model_problems
from .dynamo import (
    copy_dynamo_graph,
    find_model,
    register_frame,
    static_fakes,
    watch_recompile_limit,
)
from .eager import EagerGuard
from .errors import (
    GraphRewriteError,
    LoraFxError,
    ModelMismatchError,
    SwapError,
    UnpicklableError,
    raise_if,
    through_dynamo,
)
from .experts import implementation_problems, module_of
from .inner import InnerCompiler
from .inputs import DynamoInputs
from .logs import clock, log_compile
from .peft_model import peft_layers
from .rewrite import MODES, RewriteReport, rewrite_graph
from .slots import Adapters
from .state import LoraState

FUSE_TOKENS = 16  # Inductor: at most this many static tokens, the branch is fused reductions (CPU fp32:
# faster than two GEMM calls at 1-8 tokens, equal at 32, slower from 64; see benchmarks/)


class LoraBackend:
    """A dynamo backend that applies LoRA adapters to every graph it compiles.

    Args:
        adapters: an Adapter or a list of them (summed), or a mapping name -> Adapter (or list)
            for mixed-adapter batches (branch mode; pick each row's adapter with ``select``).
        mode: "branch" or "fold".
        inner: "inductor", "aot_eager", "eager" or a dynamo backend callable.
        options: Inductor options for inner="inductor", as ``torch.compile(options=...)`` takes them
            (names of ``torch._inductor.config``; unknown names and other inner compilers are refused).
            torch.compile's ``mode`` is Inductor options too: "reduce-overhead" is
            ``{"triton.cudagraphs": True}``, "max-autotune" is ``{"max_autotune": True,
            "triton.cudagraphs": True, "coordinate_descent_tuning": True}``
            (``torch._inductor.list_mode_options``). A ``mode`` / ``options`` given to torch.compile
            itself (transformers' ``CompileConfig`` passes mode="reduce-overhead" by default) applies
            too, under these; other inner compilers ignore it, with a warning.
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

    A backend is passed by reference: ``copy.deepcopy`` returns it (transformers deep-copies the
    ``GenerationConfig`` that holds ``CompileConfig(backend=be)``) and pickling it raises
    ``UnpicklableError``: a copy would not share its adapter tensors, graphs and lock.
    """

    base_graphs = False  # mixed batches: also compile each graph without the branch, for all-None batches

    def __init__(self, adapters: Adapters, *, mode: str = "branch", inner: str | Callable = "inductor",
                 max_rank: int | None = None, inplace: bool = False, fuse_tokens: int | None = None,
                 reserve: Sequence[Adapters] = (), requantize: Any = None,
                 options: dict[str, Any] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, found {mode!r}")
        if fuse_tokens is not None and (not isinstance(fuse_tokens, int) or fuse_tokens < 0):
            raise ValueError(f"fuse_tokens: expected an int >= 0, found {fuse_tokens!r}")
        self.mode = mode
        self.fuse_tokens = fuse_tokens if fuse_tokens is not None else FUSE_TOKENS if inner == "inductor" else 0
        self.inner = InnerCompiler(inner, options)  # options checked here, as torch.compile does
        self.state = LoraState(adapters, mode, max_rank, inplace=inplace, reserve=reserve, requantize=requantize)
        self.lock = self.state.lock
        self.reports: list[RewriteReport] = []
        self.model: torch.nn.Module | None = None
        self._seen: set[str] = set()
        self._owners: Owners | None = None  # whose weights a graph gets, shared by the graphs (see binding)
        self.eager = EagerGuard(self.state, self._seen)  # targeted modules run outside the compiled graphs (see eager)
        watch_recompile_limit()

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        """Name the model the adapter applies to (found from the call stack otherwise) and, in
        branch mode, make A and B parameters of their modules (``lora_fx_A`` / ``lora_fx_B``; lora_B's
        bias and DoRA's magnitude: ``lora_fx_B_bias`` / ``lora_fx_magnitude``).

        Call it before ``fully_shard``: FSDP2 then shards A and B with their layer and reduces
        their gradients like any parameter; ``be.parameters()`` gives the sharded parameters,
        each compiled call reads the module's current (gathered) tensors, and
        ``trained_adapter()`` gathers the full ones (a collective: call it on every rank). The
        model's ``state_dict`` then holds A and B too.

        Raises:
            GraphRewriteError: the model lacks a module the adapter names; it is already sharded;
                fold mode, mixed batches, a grouped conv (see ``LoraState.attach``).
        """
        self.model = model
        self.check(model)
        if self.state.mode == "branch":
            with self.lock:
                self.state.attach(model, g.named(model.named_modules()))
        self.eager.install(model, g.named(model.named_modules()))
        return model

    def check(self, model: torch.nn.Module) -> None:
        """Check the adapters against ``model`` before compiling (``attach`` does it too): PEFT
        layers still in place, modules the model lacks, unsupported layer types, shapes, patterns
        that match nothing; every problem of every active adapter in one error, raised here rather
        than at the first compiled call.

        Raises:
            GraphRewriteError: PEFT / diffusers LoRA layers in the model, or a module it lacks.
            ModelMismatchError: the adapters' other problems with the model.
        """
        self._check_model(model)
        problems = [f"{a.name or 'adapter'}: {p}" for slot in self.state.adapters.slots for a in slot
                    for p in model_problems(a, model)]
        raise_if(problems, ModelMismatchError, "the adapter does not fit the model:")

    def _check_model(self, model: torch.nn.Module) -> None:
        _refuse_peft_layers(peft_layers(model))
        names = g.named(model.named_modules())
        raise_if([f"{fqn}: expected a linear / Conv1D / embedding op of this module in the graph, found none; "
                  "the model has no module of that name" for fqn, spec in self.state.layout.specs.items()
                  if module_of(fqn, spec) not in names] + implementation_problems(self.state.layout.specs, names),
                 GraphRewriteError, "cannot apply the adapter to this model:")

    def __deepcopy__(self, memo: dict) -> LoraBackend:
        """The backend itself (its state is live and shared). transformers deep-copies the
        ``CompileConfig`` holding it right before compiling the model's call with it, then runs the
        prompt's prefill uncompiled: the backend takes that moment to find the model on the stack,
        as a compile does, and guard its targeted modules (``lora_fx.eager``), so the prefill gets
        the adapter too."""
        if self.model is None and self.eager.model is None:
            model = find_model(list(self.state.layout.specs))
            if model is not None and not peft_layers(model):
                self.eager.install(model, g.named(model.named_modules()))
        return self

    def __copy__(self) -> LoraBackend:
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise UnpicklableError(
            "LoraBackend: expected to be passed by reference (copy.deepcopy returns the same backend), found an "
            "attempt to pickle it: it holds live state (the adapter tensors it updates in place, compiled graphs, a "
            "lock) that a copy would not share. Save the adapter (be.trained_adapter().save(dir)) and build a "
            "backend from it where it is needed")

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **torch_compile: Any) -> Callable:
        """Dynamo's call; ``torch_compile``: the ``mode`` / ``options`` torch.compile passes a custom backend."""
        try:
            with self.inner.given(torch_compile):
                return self._compile(gm, example_inputs)
        except LoraFxError as e:  # as it is, not wrapped in dynamo's BackendCompilerFailed
            raise through_dynamo(e).with_traceback(e.__traceback__) from e.__cause__

    def _compile(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        start = clock()
        register_frame()
        gm = copy_dynamo_graph(gm)
        unrewritten = copy_dynamo_graph(gm) if self.base_graphs and self.state.mixed else None
        inputs = DynamoInputs(gm, example_inputs)
        _refuse_peft_layers(sorted({p.rpartition(".lora_")[0] for p in inputs.paths.values() if ".lora_A." in p}))
        model = self.model or find_model(list(self.state.layout.specs))
        if model is not None and self.model is None:
            self._check_model(model)
        if model is not None:
            self.eager.install(model, g.named(model.named_modules()))
            self.eager.check_experts()
        state = self.state
        read = {n for n in gm.graph.find_nodes(op="placeholder") if n.users}
        with state.lock, torch.inference_mode(False):  # the tensors it makes are never inference tensors
            done = rewrite_graph(gm, inputs, state, self.fuse_tokens, model=model, require_all=False)
        self.reports.append(done.report)
        self._seen |= set(done.report.modules) | set(done.report.substituted)
        extra = tuple(inputs.extra)
        trainable = {id(p) for t in state.trainable.values() for p in t.values()} | set(state.sources) | {
            id(d.tensors["value"]) for d in state.derived.values() if d.key in state.saved}  # enabled or not
        dropped = _drop_replaced_subclass_inputs(gm, example_inputs, read)
        kept = [x for i, x in enumerate(example_inputs) if i not in dropped]
        inner_start = clock()
        base = self.inner(unrewritten, example_inputs) if unrewritten is not None else None
        compiled = self.inner(gm, [*kept, *static_fakes(extra, trainable)])
        log_compile(gm, done.report, len(self.reports), inner_start - start, clock() - inner_start)
        if done.owned and model is not None:
            if self._owners is None or self._owners.model is not model:
                self._owners = Owners(model, state)
            binder = Binder(self._owners, done.owned, example_inputs)
        else:
            binder = None
        repacked = _repackable_modules(model) if model is not None and state.mode == "branch" else []
        return bind(compiled, extra, state, done, binder, dropped, repacked, self._seen, self.eager,
                    base if done.batch is not None else None)

    def unseen_modules(self) -> list[str]:
        """Targeted modules (and substituted parameters) that no compiled graph has held yet: after
        a forward, these ran outside the compiled graphs (or do not exist) and got no adapter."""
        return sorted((set(self.state.layout.specs) | set(self.state.layout.overrides)) - self._seen)

    def swap(self, adapters: Adapters) -> None:
        """Replace the active adapter(s) in place; the next call equals a fresh compile with them.

        Branch mode writes A and B (padded to the rank budget): trained values are replaced.
        Fold mode recomputes W' = W + scale * B A before the next call. A new adapter may target
        the compiled modules or a subset (the others contribute nothing). With a mixed-batch
        backend, pass a mapping of the slot names to replace (None empties a slot: its rows run
        the base model).

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

    def select(self, rows: Sequence[str | None], beams: int = 1) -> None:
        """Mixed batches: row i of the following calls uses adapter ``rows[i]`` (None: the base model).

        Every call must then have exactly ``len(rows) * beams`` rows: with beam search
        (num_beams = k), give one name per input row and ``beams=k``; each row's adapter is repeated
        for its k beams, as PEFT's ``adapter_names`` is. Any other batch size raises SwapError
        (a selection is never read as beams by accident). The selection is shared by all threads;
        a pool backend's ``using`` gives each thread its own.

        Raises:
            SwapError: an unknown name, a bad ``beams``, or a backend built without named adapters.
        """
        if self.state.selection is None:
            raise SwapError("select: expected a backend built with a mapping name -> adapter, found one adapter set")
        with self.lock:
            self.state.selection.select(rows, beams)

    def trained_adapter(self) -> Adapter | list[Adapter]:
        """The adapter with A and B as they are now (after training); ``.save(dir)`` writes PEFT's format."""
        adapters = self.state.trained_adapters()
        return adapters[0] if len(adapters) == 1 else adapters

    def parameters(self, as_peft: bool = False) -> list[torch.nn.Parameter]:
        """Branch mode's A and B: pass them to an optimizer to train the adapter. Asking for them
        turns their gradients on (until then a forward outside ``no_grad`` builds no autograd
        graph for them). ``as_peft``: every parameter PEFT trains for the adapter, lora_B's bias
        (lora_bias), DoRA's magnitude and modules_to_save copies too (one adapter set;
        ``trained_adapter`` reads them back).

        Raises:
            AdapterConfigError: ``as_peft`` with summed adapters that each carry a lora_B bias, or
                mixed-adapter batches with DoRA, lora_bias or modules_to_save."""
        return self.state.parameters(as_peft)

    def named_parameters(self, as_peft: bool = False) -> dict[str, dict[str, torch.nn.Parameter]]:
        """Module fqn -> {"lora_a": (R, in), "lora_b": (out, R)}, padded to the rank budget R;
        ``as_peft``: with "lora_b_bias" (out,) and "magnitude" (out,) where PEFT trains them, and a
        modules_to_save copy's module -> {"saved_<param>": the copy} (the parameter's shape).

        Embeddings keep A transposed, (vocab, R). Turns their gradients on, as ``parameters``.
        """
        self.state.parameters(as_peft)
        out = {fqn: {role: p for role, p in t.items() if as_peft or role in ("lora_a", "lora_b")}
               for fqn, t in self.state.trainable.items()}
        for path, p in self.state.saved.items() if as_peft else ():  # modules_to_save copies: "saved_<param>"
            module, _, param = path.rpartition(".")
            out.setdefault(module, {})[f"saved_{param}"] = p
        return out


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


def _refuse_peft_layers(names: Sequence[str]) -> None:
    """A model (or graph) still holding PEFT / diffusers LoRA layers: a lora_fx backend would
    apply its adapter on top of theirs, or rewrite none of its targets (their ops are PEFT's)."""
    raise_if([f"{n}: a PEFT LoRA layer (base_layer + lora_A / lora_B) is still in the model" for n in names[:8]]
             + ([f"... and {len(names) - 8} more"] if len(names) > 8 else []), GraphRewriteError,
             "cannot apply a lora_fx adapter to a model that PEFT still adapts: take its adapters and the bare model "
             "with `model, adapters = lora_fx.from_peft(peft_model)` and compile that model, or remove PEFT's layers "
             "first (peft_model.unload(); diffusers: pipe.unload_lora_weights()):")


def backend(adapters: Adapters, *, mode: str = "branch", inner: str | Callable = "inductor",
            max_rank: int | None = None, inplace: bool = False, fuse_tokens: int | None = None,
            reserve: Sequence[Adapters] = (), requantize: Any = None,
            options: dict[str, Any] | None = None, slots: int | None = None,
            host_bytes: int | None = None) -> LoraBackend:
    """A torch.compile backend applying ``adapters``: ``torch.compile(model, backend=backend(a))``.

    See :class:`LoraBackend` for the arguments. ``slots=N``: a serving pool
    (:class:`lora_fx.pool.PoolBackend`): ``adapters`` is a registry name -> Adapter or PEFT
    directory, of any size; N slots are compiled, filled on demand by ``using``; ``host_bytes``
    bounds the adapters loaded from disk that are kept in host memory.
    """
    if slots is not None:
        from .pool import PoolBackend

        return PoolBackend(adapters, slots=slots, host_bytes=host_bytes, inner=inner, max_rank=max_rank,
                           fuse_tokens=fuse_tokens, reserve=reserve, options=options, mode=mode)
    return LoraBackend(adapters, mode=mode, inner=inner, max_rank=max_rank, inplace=inplace, fuse_tokens=fuse_tokens,
                       reserve=reserve, requantize=requantize, options=options)
