"""What the backend needs from dynamo beyond the backend protocol.

- ``copy_dynamo_graph``: dynamo reads its own GraphModule after the backend returns, so passes
  work on a copy (higher-order-op bodies included).
- ``static_fakes``: the tensors lora_fx adds, as fake tensors of dynamo's fake mode.
- the recompile-limit watch: past ``recompile_limit`` dynamo would run a frame's plain Python
  code (the base model); for frames a lora_fx backend compiled, that raises instead.
- ``find_model``: the model the adapter names, from the call stack of the frame being compiled.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from . import graph as g
from .errors import RecompileLimitError


def _copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, value_map))
    new_gm = fx.GraphModule(gm, graph)
    for name, child in gm.named_children():  # higher-order-op bodies: copied too, passes change them
        if isinstance(child, fx.GraphModule):
            setattr(new_gm, name, _copy_graph_module(child)[0])
    return new_gm, value_map


def copy_dynamo_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of dynamo's GraphModule (and its subgraphs) that can be changed without touching dynamo's own."""
    new_gm, value_map = _copy_graph_module(gm)
    for old, new in value_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    new_gm.meta = dict(gm.meta)
    for attr in ("_param_name_to_source",):
        if hasattr(gm, attr):
            setattr(new_gm, attr, getattr(gm, attr))
    return new_gm


def static_fakes(tensors: tuple[torch.Tensor, ...], trainable: set[int]) -> list[torch.Tensor]:
    """Our tensors as fake tensors of static shape in the backend's fake mode.

    Real tensors that dynamo did not see would be fakified by AOTAutograd with fresh symbolic
    sizes that have no source, and dynamo then fails to build its shape guards. With gradients
    on, A and B are traced as requiring grad whatever they are now, so a graph compiled before
    training starts still gives them gradients (dynamo does not guard on tensors it did not see).
    """
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    mode = getattr(ctx, "fake_mode", None)
    if mode is None:
        return list(tensors)
    grad = torch.is_grad_enabled()
    fakes = [mode.from_tensor(t, static_shapes=True) for t in tensors]
    return [f.requires_grad_(True) if grad and id(t) in trainable and not f.requires_grad else f
            for f, t in zip(fakes, tensors)]


# -- past dynamo's recompile limit, dynamo runs the plain Python code: the base model. A frame that
# a lora_fx backend compiled must raise instead. Dynamo calls its recompile user-context hooks at
# the start of every compile, just before it checks the limit, whatever the logging settings; the
# hook makes the same check for the frames lora_fx compiled and raises. (Torch without that hook:
# a filter on the warning dynamo logs there, which quiet logging switches off.)
_CODES: weakref.WeakSet = weakref.WeakSet()  # code objects a lora_fx backend compiled


def _compile_locals() -> dict[str, Any]:
    """The locals of dynamo's ``_compile`` for the frame it is compiling now, from the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_compile" and frame.f_globals.get("__name__") == "torch._dynamo.convert_frame":
            return frame.f_locals
        frame = frame.f_back
    return {}


def _code_being_compiled() -> Any:
    """The code object dynamo is compiling now (a local of its ``_compile``), from the stack."""
    return _compile_locals().get("code")


def _limit_error(limit: str, function: str) -> RecompileLimitError:
    return RecompileLimitError(
        f"{function}: dynamo reached torch._dynamo.config.{limit} and would run it without the adapter from now on; "
        f"raise torch._dynamo.config.{limit} (new shapes or dtypes each compile a graph), or mark the changing "
        "dimension dynamic (torch.compile(..., dynamic=True))")


def _check_recompile_limit() -> str:
    """Dynamo's recompile hook: raise before dynamo would give up on a frame lora_fx compiled."""
    local = _compile_locals()
    code, cache_size, compile_id = local.get("code"), local.get("cache_size"), local.get("compile_id")
    if code is None or code not in _CODES or cache_size is None or compile_id is None:
        return ""
    from torch._dynamo.cache_size import exceeds_recompile_limit

    exceeded, limit = exceeds_recompile_limit(cache_size, compile_id)
    if exceeded:
        raise _limit_error(limit, f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})")
    return ""


class _RecompileLimitFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("torch._dynamo hit config.") and _code_being_compiled() in _CODES:
            args = record.args if isinstance(record.args, tuple) else ()
            raise _limit_error(args[0] if args else "recompile_limit",
                               str(args[2]) if len(args) > 2 else "a compiled function")
        return True


_WATCHING = [False]


def watch_recompile_limit() -> None:
    """Install the recompile-limit check once per process."""
    if _WATCHING[0]:
        return
    _WATCHING[0] = True
    register = getattr(torch._dynamo, "register_hook_for_recompile_user_context", None)
    if register is not None:
        register(_check_recompile_limit)
        return
    log = logging.getLogger("torch._dynamo.convert_frame")
    log.addFilter(_RecompileLimitFilter())


def register_frame() -> None:
    code = _code_being_compiled()
    if code is not None:
        _CODES.add(code)


def find_model(fqns: Sequence[str]) -> torch.nn.Module | None:
    """The model the adapter names, from the Python stack of the frame being compiled: the module
    (``self`` of a caller, or a compiled wrapper's ``_orig_mod``) whose module names cover most of
    ``fqns``. Dynamo compiles a frame when it is entered, so its callers are on the stack. When no
    module holds any of them, the module ``torch.compile`` wrapped (so that the caller can say the
    model lacks them), else None."""
    best, best_count, wrapped = None, 0, None
    frame = sys._getframe(1)
    seen: set[int] = set()
    while frame is not None:
        obj = frame.f_locals.get("self")
        wrapped = wrapped or getattr(obj, "_orig_mod", None)
        for m in (obj, getattr(obj, "_orig_mod", None)):
            if isinstance(m, torch.nn.Module) and id(m) not in seen:
                seen.add(id(m))
                names = g.named(m.named_modules())
                count = sum(f in names for f in fqns)
                if count > best_count or (count == best_count and count and best is None):
                    best, best_count = m, count
        frame = frame.f_back
    return best if best is not None else wrapped if isinstance(wrapped, torch.nn.Module) else None
