"""The function dynamo calls for one compiled graph (``bind``) and the checks it makes before
running it: training through what lora_fx cannot train (a kernel traced without a backward, a
repacked bitsandbytes weight, a substituted parameter), weights another backend merged in place,
a mixed batch that does not match the selection; then the binding (:mod:`lora_fx.binding`), the
derived tensors brought up to date, and the call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import eager_experts, inplace
from . import graph as g
from .binding import Binder, base_table, bound_table
from .eager import EagerGuard, any_pending, computed_by_graph
from .errors import GraphRewriteError, raise_if
from .inplace import merged_by_other, merged_problem
from .rewrite import Rewritten
from .state import LoraState, resolve, stamp


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


def bind(compiled: Callable, extra: tuple, state: LoraState, done: Rewritten, binder: Binder | None,
          dropped: set[int] = frozenset(), repacked: Sequence[tuple[str, torch.nn.Module]] = (),
          seen: set[str] | None = None, eager: EagerGuard | None = None,
          base: Callable | None = None) -> Callable:
    """The function dynamo calls for one graph: bind the modules whose weights it gets (see
    :mod:`lora_fx.binding`), bring what it reads up to date, then run it.

    ``extra`` are the tensors appended to every call: those of a derived set are looked up again
    whenever a set was recomputed (into new tensors), A / B and the selection are passed as they
    are, attached A / B are read from their module (FSDP2 swaps its sharded and gathered forms).
    ``done.no_backward``: modules traced without a backward (``collect._traced_without_gradient``),
    ``repacked``: bitsandbytes 4-bit modules: a call that would train through them raises.
    ``dropped``: positions of the call's arguments the compiled graph no longer takes. ``seen``:
    the modules the backend's graphs have held, bound ones added. ``base``: the graph compiled
    without the LoRA branch, run instead when no row of a mixed batch has an adapter.
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
    # parameters the graph reads through a substitution without giving them PEFT's gradient: a
    # backward through it is refused (training A / B through it is refused at the call)
    untrained = done.untrained + [(_replaced_problem(key), ref) for key, ref in replaced]
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
        refused = [why for why, ref in untrained if resolve((ref,), args)[0].requires_grad] \
            if untrained and torch.is_grad_enabled() else []
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
            own, graph = None, compiled
            if state.selection is not None:  # this thread's rows (checked against the batch)
                own = state.selection.apply(None if done.batch is None else _batch_size(done.batch, args))
                if base is not None and state.selection.all_base():  # no row has an adapter
                    if own is None:
                        return base(*args)
                    graph, tensors = base, ()  # the graph without the branch
            if state.dropout.compiled:  # the rate the graphs' lora_dropout reads: 0 outside train mode
                model = eager.model if eager is not None else None
                state.dropout.set_for_call(state.adapters, model.training if model is not None else True)
            if eager is not None and eager.experts:  # experts modules running eagerly next are this call's
                eager_experts.running(eager)
            if graph is compiled:
                tensors = table.tensors(args)
                if eager is not None and any_pending():  # a module runs eagerly around this graph
                    computed_by_graph(eager.modules(table.modules))
                if dropped:
                    args = [a for i, a in enumerate(args) if i not in dropped]
                if own is not None:  # this thread's selection, in place of the shared one
                    shared = (state.selection.index, state.selection.rows)
                    tensors = [own[0] if t is shared[0] else own[1] if t is shared[1] else t for t in tensors]
            if own is None:
                out = compiled(*args, *tensors)
        if own is not None:  # a using block: its slots are held, no other thread writes them (see pool)
            out = graph(*args, *tensors)
        _refuse_backward(out, refused)
        return out

    return run


def _refuse_training(fqns: Sequence[str]) -> None:
    raise GraphRewriteError(
        [f"{fqn}: its quantized kernel was traced for an input that needs no gradient (the model is frozen), "
         "so the compiled graph has no backward through it" for fqn in fqns],
        header="cannot train through this graph: the gradients of A / B before these modules would be wrong. "
               "Call model.enable_input_require_grads() before the first compiled call (as PEFT's "
               "prepare_model_for_kbit_training does), or run inference under torch.no_grad():")


def _replaced_problem(path: str) -> str:
    return (f"{path}: the adapter's tensor (modules_to_save, or a saved bias) replaces this parameter in the "
            "graph, so the model's own parameter would get no gradient (a modules_to_save copy trains as PEFT's "
            "with be.parameters(as_peft=True) / for_training; a saved bias does not train)")


def _refuse_training_replaced(paths: Sequence[str]) -> None:
    raise_if([_replaced_problem(path) for path in paths], GraphRewriteError,
             "cannot train through this graph: freeze these parameters (requires_grad_(False)) to train A and B "
             "alone, or train this adapter with PEFT:")


def _refuse_backward(out: Any, problems: list[str]) -> None:
    """A backward that reaches ``out`` raises, naming the parameters it would leave without PEFT's
    gradient: the forward (an inference call that merely did not turn gradients off) runs."""
    if not problems:
        return

    def refuse(grad: torch.Tensor) -> None:
        raise GraphRewriteError(problems, header="cannot train through this graph: these parameters require "
                                "grad and would not get PEFT's gradient; freeze them (requires_grad_(False)):")

    for t in torch.utils._pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            t.register_hook(refuse)


def _batch_size(batch: Any, args: Sequence[Any]) -> int:
    return batch if isinstance(batch, int) else args[batch[1]].shape[0] if batch[0] == "shape" else args[batch[1]]
