"""A targeted module never runs eagerly with the adapter on and returns the base output.

Some callers run a module outside every compiled graph: a block left out of a regional compile
(diffusers' ``compile_repeated_blocks`` leaves a Flux transformer's own ``proj_out`` eager), a
frame dynamo skips or falls back on, code that calls the model uncompiled (transformers'
``generate`` runs the prompt's prefill with ``self(**inputs)``, TRL its loss head). The backend
installs two hooks on every module it targets (once it knows the model): traced into compiled
graphs they do nothing; run eagerly, the first notes the call, and the second, unless a compiled
graph computed the module's output meanwhile (its forward compiled on its own), adds the update
with lora_fx's reference math (:mod:`lora_fx.reference`, PEFT's formulas) from the adapter as the
backend holds it now (trained A / B, scale, disabled). Slow, exact, trainable.

Mixed-adapter batches add each row's update from its selected adapter. Where no eager formula
keeps PEFT's semantics it raises instead, naming the module: a module whose parameter an adapter
replaces (modules_to_save, a saved bias) or merges into (LoRA on parameters). Past dynamo's
recompile limit a frame raises earlier, in :mod:`lora_fx.dynamo`.
"""

from __future__ import annotations

import re
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import eager_experts
from .diffusers import refuse_call_scale
from .errors import GraphRewriteError, raise_if
from .experts import module_of
from .targets import module_kind

_LOCAL = threading.local()  # per thread: (guard, module fqn) -> its calls running eagerly, computed by a graph yet


def _pending() -> dict[tuple[int, str], list[bool]]:
    calls = getattr(_LOCAL, "calls", None)
    if calls is None:
        calls = _LOCAL.calls = {}
    return calls


def computed_by_graph(keys: Iterable[tuple[int, str]]) -> None:
    """A compiled call computed these modules' outputs (with their update; ``EagerGuard.modules``):
    called by every compiled call while some module runs eagerly in this thread."""
    calls = getattr(_LOCAL, "calls", None)
    if calls:
        for key in keys:
            stack = calls.get(key)
            if stack:
                stack[-1] = True


@contextmanager
def suspended() -> Iterator[None]:
    """No eager update in this thread inside the block (the reference math applies its own)."""
    was = getattr(_LOCAL, "off", False)
    _LOCAL.off = True
    try:
        yield
    finally:
        _LOCAL.off = was


def any_pending() -> bool:
    return bool(getattr(_LOCAL, "calls", None))


# module -> (EagerGuard, fqn, why it cannot run eagerly, whether hooks of its own guard it)
_GUARDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INSTALLED = [False]
EXPERTS_IN_GRAPHS = ("its experts' LoRA is applied inside the compiled graphs, where grouped_mm / batched_mm read the "
                     "3-D parameter")


def _install_hooks() -> None:
    """One pair of global module hooks for every guarded module: dynamo traces a module's own hooks
    and guards on their ids, so per-module hooks would make each repeated block's graph its own.
    Installed when a backend is built, before dynamo traces anything with it: global hooks that
    appear in the middle of a compile make a restarted analysis take another path (dynamo's
    speculation log diverges, measured with dynamic=True). torch warns at every
    ``torch.compile(module)`` call while any global hook exists (they also fire for the
    OptimizedModule wrapper, where these do nothing); that warning is silenced for these hooks."""
    if not _INSTALLED[0]:
        _INSTALLED[0] = True
        warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
        torch.nn.modules.module.register_module_forward_pre_hook(_pre)
        torch.nn.modules.module.register_module_forward_hook(_post, always_call=True)


def _pre(module: torch.nn.Module, args: Any, *, own: bool = False) -> None:
    if torch.compiler.is_compiling() or not _GUARDED or getattr(_LOCAL, "off", False):
        return
    entry = _GUARDED.get(module)
    if entry is not None and entry[3] == own:
        _pending().setdefault((id(entry[0]), entry[1]), []).append(False)


def _post(module: torch.nn.Module, args: Any, out: Any, *, own: bool = False) -> Any:
    if torch.compiler.is_compiling() or not _GUARDED or getattr(_LOCAL, "off", False):
        return None
    entry = _GUARDED.get(module)
    if entry is None or entry[3] != own:
        return None
    guard, fqn, why, _ = entry
    key = (id(guard), fqn)
    stack = _pending().get(key)
    computed = stack.pop() if stack else True
    if stack is not None and not stack:
        del _pending()[key]
    return None if computed else guard.update(module, fqn, why, args, out)


def _own_pre(module: torch.nn.Module, args: Any) -> None:
    _pre(module, args, own=True)


def _own_post(module: torch.nn.Module, args: Any, out: Any) -> Any:
    return _post(module, args, out, own=True)


class EagerGuard:
    """The eager path of one backend's targeted modules on one model (see the module docstring)."""

    def __init__(self, state: Any, seen: set[str] | None = None):
        self.state = state
        self.seen = set() if seen is None else seen  # expert parameters given their update eagerly
        _install_hooks()
        self.model: torch.nn.Module | None = None
        self.handles: list = []  # the hooks of its modules outside repeated blocks
        self.experts: list = []  # its experts modules (see eager_experts)

    def install(self, model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> None:
        """Guard ``model``'s targeted modules. A module inside a repeated block (a name with an
        index, ``layers.3.mlp``) is guarded by the global module hooks: dynamo traces a module's own
        hooks and guards on their ids, so hooks of its own would make each block's graph differ
        from the next one's. Any other module gets hooks of its own (no cost to other modules)."""
        if self.model is model:
            return
        for mod, entry in list(_GUARDED.items()):
            if entry[0] is self:
                del _GUARDED[mod]
        for h in self.handles:
            h.remove()
        for mod in self.experts:
            eager_experts.unguard(mod, self)
        self.model, self.handles, self.experts = model, [], []
        refuse_call_scale(model)
        overridden = {path.rpartition(".")[0] for path in self.state.layout.overrides}
        for fqn, spec in self.state.layout.specs.items():
            mod = modules.get(module_of(fqn, spec))
            if mod is None:
                continue
            if spec.experts and eager_experts.runs_eagerly(mod):  # the experts loop never reaches a graph
                name = module_of(fqn, spec)
                eager_experts.guard(mod, self, lambda mod=mod, name=name: self.expert_updates(mod, name))
                self.experts.append(mod)
                continue
            why = (EXPERTS_IN_GRAPHS if spec.experts
                   else "its parameter is merged with the adapter inside the compiled graphs" if spec.param
                   else "the adapter replaces one of its parameters inside the compiled graphs"
                   if fqn in overridden else None)
            repeated = re.search(r"\.\d+(\.|$)", fqn) is not None
            _GUARDED[mod] = (self, fqn, why, not repeated)
            if repeated:
                _install_hooks()
            else:
                self.handles += [mod.register_forward_pre_hook(_own_pre),
                                 mod.register_forward_hook(_own_post, always_call=True)]

    def expert_updates(self, module: torch.nn.Module, fqn: str) -> tuple[dict, bool]:
        """What an eager call of experts module ``fqn`` gives each read of its adapted parameters:
        the update the compiled graphs would give it (``eager_experts.ExpertUpdates``' arguments)."""
        state, params = self.state, {}
        if getattr(_LOCAL, "off", False):  # the reference math applies its own
            return params, state.mode == "fold"
        for path, spec in state.layout.specs.items():
            if not spec.experts or module_of(path, spec) != fqn:
                continue
            self.seen.add(path)
            if not (state.enabled and state._multiplier):
                continue
            if state.inplace and (sets := [d for d in state.derived.values() if d.key == path]) \
                    and all(d.merged for d in sets):
                continue  # the parameter holds the merge
            p = getattr(module, path.rpartition(".")[2])
            params[id(p)] = (p, eager_experts.factors_of(state.live_weights(path, module), spec.experts))
        return params, state.mode == "fold"

    def check_experts(self) -> None:
        """Before each compile: an experts module whose LoRA the graphs apply (grouped_mm /
        batched_mm when the backend installed) now computing with the eager loop would get none
        (its loop runs outside the graphs, unguarded): refused, naming it."""
        raise_if([f"{fqn}: {type(mod).__name__} now computes with experts implementation "
                  f"{eager_experts.implementation(mod)!r}; the backend applies its expert LoRA inside the compiled "
                  "graphs, which that loop never reaches. Build the backend after set_experts_implementation"
                  for mod, (guard, fqn, why, _) in list(_GUARDED.items())
                  if guard is self and why == EXPERTS_IN_GRAPHS and eager_experts.runs_eagerly(mod)],
                 GraphRewriteError, "cannot apply the adapter:")

    def modules(self, fqns: Iterable[str]) -> list[tuple[int, str]]:
        return [(id(self), f) for f in fqns]

    def update(self, module: torch.nn.Module, fqn: str, why: str | None, args: Any, out: Any) -> Any:
        """The output of ``module`` run eagerly: with the update added, or an error."""
        state = self.state
        if not (state.enabled and state._multiplier) or not isinstance(out, torch.Tensor):
            return None
        if why is not None:
            raise GraphRewriteError(
                f"{fqn}: ran outside the compiled graphs with the adapter on ({why}, so its output here would "
                "have no LoRA update); compile the code that calls this module, or run the base model under "
                "be.disabled()")
        if state.inplace:
            sets = [d for d in state.derived.values() if d.key == fqn]
            if sets and all(d.merged for d in sets):
                return None  # the model's own weight holds the merge
        if state.mixed:
            return self._rows_update(module, fqn, args, out)
        rate = state.dropout.rate(state.adapters) if state.dropout.compiled and module.training else 0.0
        if rate and torch.is_grad_enabled() and module_kind(module) != "embedding":  # as a training graph
            state.dropout.set_for_call(state.adapters, True)  # one rate, or the graphs' error
            args = (torch.nn.functional.dropout(args[0], rate, training=True), *args[1:])
        return eager_update(module, args, out, state.live_weights(fqn, module))

    def _rows_update(self, module: torch.nn.Module, fqn: str, args: Any, out: torch.Tensor) -> torch.Tensor:
        """Mixed batches: each row's update from its selected adapter (beams repeat a row), as the
        compiled graphs select it."""
        from .errors import SwapError

        state = self.state
        batch = out.shape[0]
        chosen, beams = state.selection.current() or ((0,) * batch, 1)
        if batch != len(chosen) * beams:
            raise SwapError(f"{fqn}: mixed batch: expected {len(chosen) * beams} rows ({len(chosen)} selected x "
                            f"{beams} beams), found {batch}; select one name per row of this batch, or declare "
                            "beams (select(rows, beams=k))")
        per_row = [k for k in chosen for _ in range(beams)]
        device = next((t.device for t in module.parameters(recurse=False)), None)
        result = out
        for slot in sorted(set(per_row) - {0}):
            ws = [w.to(device).scaled(state._multiplier) for w in state.adapters.weights(slot - 1, fqn)]
            idx = torch.tensor([i for i, k in enumerate(per_row) if k == slot], device=out.device)
            part = eager_update(module, (args[0].index_select(0, idx), *args[1:]), out.index_select(0, idx), ws)
            result = result.index_copy(0, idx, part.to(result.dtype))
        return result


def eager_update(module: torch.nn.Module, args: Any, out: torch.Tensor, weights: list) -> torch.Tensor:
    """``out`` plus the LoRA update of ``weights`` on ``module``'s input, PEFT's math."""
    from .reference import _conv_hook, _embedding_hook, _linear_hook

    if not weights:
        return out
    kind = module_kind(module)
    hook = (_embedding_hook(weights) if kind == "embedding" else _conv_hook(weights) if kind == "conv"
            else _linear_hook(module, weights))
    return hook(module, args, out)
