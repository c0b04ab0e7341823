"""The inner compiler: what a backend hands each rewritten graph to, with the Inductor options it runs.

``lora_fx.backend(a, options={...})`` gives Inductor its options as ``torch.compile(options=...)``
does (the same names, checked the same way). torch.compile's own ``mode`` / ``options`` reach a
custom backend as keyword arguments of its call (transformers' ``CompileConfig`` always passes
``mode``, "reduce-overhead" by default): with inner="inductor" they apply as they would to Inductor,
under the backend's own options; another inner compiler ignores them, as dynamo's own aot_eager
and eager backends do, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import fx

INNER = ("inductor", "aot_eager", "eager")
_GIVEN: ContextVar[dict[str, Any] | None] = ContextVar("lora_fx_torch_compile_options", default=None)


def inductor_options(options: dict[str, Any] | None, mode: str | None = None, *,
                     what: str = "options") -> dict[str, Any]:
    """Inductor config patches for ``mode`` (``torch._inductor.list_mode_options``) and ``options``,
    checked as ``torch.compile`` checks them: names of ``torch._inductor.config``, values of its types.

    Raises:
        ValueError: every unknown name at once, or a value of the wrong type, or an unknown mode.
    """
    from torch._inductor import config

    if not options and not mode:
        return {}
    options = dict(options or {})
    known = config.get_config_copy()
    unknown = [k for k in options if not isinstance(k, str) or k.replace("-", "_") not in known]
    if unknown:
        raise ValueError(f"{what}: expected names of Inductor's config (torch._inductor.config, as "
                         f"torch.compile(options=...) takes them), found unknown {unknown}")
    try:  # torch.compile's own translation and type checks
        return dict(torch._TorchCompileInductorWrapper(mode, options, None).config)
    except RuntimeError as e:
        raise ValueError(f"{what}: {e}") from None


class InnerCompiler:
    """Compiles a rewritten graph with ``inner``: "inductor" (with ``options``), "aot_eager",
    "eager" or a dynamo backend callable.

    Raises:
        ValueError: an unknown inner name; options with an inner compiler other than "inductor";
            an unknown Inductor option.
    """

    def __init__(self, inner: str | Callable, options: dict[str, Any] | None = None):
        if not callable(inner) and inner not in INNER:
            raise ValueError(f"inner: expected one of {INNER} or a dynamo backend callable, found {inner!r}")
        if options and inner != "inductor":
            raise ValueError(f"options: Inductor options (torch.compile's options=) need inner='inductor', found "
                             f"inner={inner!r} with options {sorted(options)}")
        self.name = inner if isinstance(inner, str) else getattr(inner, "__name__", repr(inner))
        self.inductor = inner == "inductor"
        self.options = inductor_options(options)
        if callable(inner):
            self.compile = inner
        elif inner == "eager":
            self.compile = lambda gm, example_inputs: gm.forward
        else:
            from torch._dynamo import lookup_backend

            self.compile = lookup_backend(inner)
        self._warned: set[str] = set()

    @contextmanager
    def given(self, torch_compile: dict[str, Any]) -> Iterator[None]:
        """Inside the block, compiles take the ``mode`` / ``options`` torch.compile passed the backend."""
        patches = {}
        if torch_compile:
            if self.inductor:
                patches = inductor_options(torch_compile.get("options"), torch_compile.get("mode"),
                                           what="torch.compile's mode / options")
            elif repr(torch_compile) not in self._warned:
                self._warned.add(repr(torch_compile))
                warnings.warn(f"torch.compile's {torch_compile}: Inductor options, which this lora_fx backend's "
                              f"inner compiler {self.name!r} ignores (as dynamo's own aot_eager and eager backends "
                              "do); transformers' CompileConfig passes mode='reduce-overhead' unless given "
                              "mode='default'", stacklevel=3)
        token = _GIVEN.set(patches)
        try:
            yield
        finally:
            _GIVEN.reset(token)

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        patches = {**(_GIVEN.get() or {}), **self.options}  # the backend's own options win
        if self.inductor and patches:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs, config_patches=patches)
        return self.compile(gm, example_inputs)
