"""Ahead-of-time packages: torch.export, lora_fx's rewrite, AOTInductor, with a swappable adapter.

``export(model, args, adapters, path=...)`` exports the model, rewrites the ExportedProgram (the
adapter's tensors become named constants of the program: padded A / B and per-rank scales in
branch mode, with the per-rank scales folded into B; W' in fold mode) and compiles it into an
AOTInductor package. What the package was
built for (modules, shapes, dtypes, rank budget, the constants' names) is stored in its metadata.

``load_package(path)`` runs it with no torch.compile and no rewrite. ``swap`` / ``set_scale`` /
``disable`` compute the new constants with the same builders the backend uses, check every name,
shape, dtype and rank against what the package was built with (AOTInductor's constant loading
accepts a wrong shape or dtype silently, with wrong output) and only then load them; the package
is never rebuilt.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import torch

from .adapter import Adapter, as_adapters
from .errors import GraphRewriteError, LoraFxError, SwapError, raise_if
from .inputs import HOLDER, _attr_name
from .rewrite import RewriteConfig, rewrite
from .slots import AdapterSet, Layout, ModuleSpec
from .targets import module_kind
from .tensors import fold_tensors, padded_ab, rank_scale

META_KEY = "lora_fx"
BASE_FILE = "extra/lora_fx_base.safetensors"  # fold packages: the targeted modules' own weights


class PackageInputError(LoraFxError, ValueError):
    """A package called with inputs outside the shapes it was exported for (AOTInductor runs them
    unchecked, with output nobody tested)."""


def constant_name(fqn: str, role: str) -> str:
    """The package constant of module ``fqn``'s tensor ``role`` (as ``rewrite`` names it)."""
    return f"{HOLDER}.{_attr_name(f'{fqn}.{role}')}"


def _spec_json(spec: ModuleSpec) -> dict[str, Any]:
    return {"shape": list(spec.shape), "dtype": str(spec.dtype).removeprefix("torch."), "embedding": spec.embedding,
            "dora": spec.dora, "lora_bias": spec.lora_bias, "kernel": list(spec.kernel), "groups": spec.groups,
            "param": spec.param}


def _spec_of(d: dict[str, Any]) -> ModuleSpec:
    return ModuleSpec(tuple(d["shape"]), getattr(torch, d["dtype"]), d["embedding"], d["dora"], d["lora_bias"],
                      tuple(d["kernel"]), d["groups"], d["param"])


def export(model: torch.nn.Module, args: tuple, adapters: Adapter | Sequence[Adapter], *, path: str | os.PathLike,
           kwargs: dict[str, Any] | None = None, mode: str = "branch", dynamic_shapes: Any = None,
           max_rank: int | None = None, strict: bool = False, inductor_configs: dict[str, Any] | None = None) -> str:
    """Export ``model`` with ``adapters`` applied into an AOTInductor package at ``path``.

    Args:
        model, args, kwargs, dynamic_shapes, strict: as ``torch.export.export``.
        adapters: an Adapter or a list (summed).
        mode: "branch" (A, B and scales are constants: any adapter within the rank budget and the
            modules swaps in) or "fold" (W' per targeted module is a constant).
        max_rank: branch mode's rank budget (default: the adapters' largest rank).
        inductor_configs: passed to ``aoti_compile_and_package``.

    Returns:
        The package's path.

    Raises:
        GraphRewriteError: what ``rewrite`` refuses; DoRA, LoRA on parameters and replaced
            tensors (modules_to_save), which a package's swap does not rebuild.
    """
    adapters = as_adapters(adapters)
    cfg = RewriteConfig(adapters, mode=mode, max_rank=max_rank)
    aset = AdapterSet(adapters)
    layout = Layout.of(aset, max_rank)
    problems = [f"{fqn}: DoRA in a package is not supported (its norms need the base weight at each swap)"
                for fqn, s in layout.specs.items() if s.dora]
    problems += [f"{fqn}: LoRA on a parameter in a package is not supported" for fqn, s in layout.specs.items()
                 if s.param]
    problems += [f"{p}: replaced tensors (modules_to_save, biases) in a package are not supported"
                 for p in sorted(layout.overrides)]
    problems += [f"{fqn}: lora_bias in a package is not supported (AOTInductor inlines small tensors, so it could "
                 "not be swapped)" for fqn, s in layout.specs.items() if s.lora_bias]
    raise_if(problems, GraphRewriteError, "cannot package these adapters:")
    mods = dict(model.named_modules())
    kinds = {fqn: module_kind(mods[fqn]) for fqn in layout.specs if fqn in mods}
    with torch.no_grad():
        ep = torch.export.export(model, tuple(args), kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
        inputs = input_bounds(ep)
        ep = rewrite(ep, cfg)
        if mode == "branch":  # AOTInductor inlines the small per-rank scales: fold them into B, scale 1
            for fqn in layout.specs:
                scale = ep.state_dict[constant_name(fqn, "scale")]
                ep.state_dict[constant_name(fqn, "lora_b")].mul_(_over_ranks(scale, layout.specs[fqn]))
                scale.fill_(1.0)
    meta = {"mode": mode, "rank": layout.rank, "specs": {f: _spec_json(s) for f, s in layout.specs.items()},
            "kinds": kinds, "constants": {}, "inputs": inputs}
    for fqn in layout.specs:
        for role in ("weight", "bias") if mode == "fold" else ("lora_a", "lora_b"):
            name = constant_name(fqn, role)
            t = ep.state_dict.get(name, ep.constants.get(name))
            if t is not None:
                meta["constants"][name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}), META_KEY: json.dumps(meta)}
    path = os.fspath(path)
    torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=configs)
    if mode == "fold":  # W' = W + scale * B A at each swap needs W: stored beside the compiled code
        from safetensors.torch import save

        base = {}
        for fqn in layout.specs:
            for name in ("weight", "bias"):
                t = getattr(mods[fqn], name, None)
                if isinstance(t, torch.Tensor):
                    base[f"{fqn}.{name}"] = t.detach().contiguous()
        with zipfile.ZipFile(path, "a") as z:
            z.writestr(BASE_FILE, save(base))
    return path


def input_bounds(ep: torch.export.ExportedProgram) -> list[dict[str, Any]]:
    """The program's tensor inputs in the order its runner takes them, each with its name and a
    [min, max] per dim (max None: unbounded), from the export's shapes and range constraints."""
    from torch.utils._sympy.value_ranges import bound_sympy

    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    out = []
    for name in ep.graph_signature.user_inputs:
        val = vals.get(name) if isinstance(name, str) else None
        if not isinstance(val, torch.Tensor):
            continue  # a non-tensor input (use_cache=False) is baked into the program
        dims = []
        for d in val.shape:
            if isinstance(d, int):
                dims.append([d, d])
                continue
            r = bound_sympy(d.node.expr, ep.range_constraints)
            dims.append([int(r.lower), int(r.upper) if r.upper.is_Integer else None])  # not int_oo
        out.append({"name": name, "dims": dims})
    return out


class LoraPackage:
    """A loaded package: call it like the model; ``swap`` / ``set_scale`` / ``disable`` / ``enable``
    load new constants after checking them against what the package was built for."""

    def __init__(self, path: str | os.PathLike, adapters: list[Adapter] | None = None):
        self.path = os.fspath(path)
        self.runner = torch._inductor.aoti_load_package(self.path)
        raw = self.runner.get_metadata().get(META_KEY)
        if raw is None:
            raise SwapError(f"{self.path}: expected a package made by lora_fx.export, found no lora_fx metadata")
        meta = json.loads(raw)
        self.mode, self.rank, self.kinds = meta["mode"], meta["rank"], meta["kinds"]
        self.layout = Layout({f: _spec_of(s) for f, s in meta["specs"].items()}, meta["rank"], (), frozenset())
        self.constants = meta["constants"]
        self.inputs: list[dict[str, Any]] | None = meta.get("inputs")  # None: a package without them
        self.in_spec = torch.utils._pytree.treespec_loads(self.runner.loader.get_call_spec()[0])
        self.base: dict[str, torch.Tensor] = {}
        if self.mode == "fold":
            from safetensors.torch import load

            with zipfile.ZipFile(self.path) as z:
                self.base = load(z.read(BASE_FILE))
        self.adapters = adapters
        self.multiplier, self.enabled = 1.0, True
        _import_output_types(self.runner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the package; PackageInputError for an input outside the export's shape bounds (a
        sequence longer than ``lora-fx export --max-seq``), which AOTInductor would run unchecked."""
        if self.inputs is not None:
            raise_if(self._input_problems(args, kwargs), PackageInputError,
                     f"{self.path}: inputs outside the shapes the package was exported for (export it again with "
                     "wider bounds: dynamic_shapes' Dim max, or lora-fx export --max-seq):")
        return self.runner(*args, **kwargs)

    def _input_problems(self, args: tuple, kwargs: dict[str, Any]) -> list[str]:
        """Each tensor input's dims against the export's [min, max], in the runner's input order."""
        from torch.export._tree_utils import reorder_kwargs

        leaves = torch.utils._pytree.tree_leaves((args, reorder_kwargs(kwargs, self.in_spec)))
        flat = [x for x in leaves if isinstance(x, torch.Tensor)]
        if len(flat) != len(self.inputs):
            return [f"expected {len(self.inputs)} tensor inputs ({', '.join(i['name'] for i in self.inputs)}), "
                    f"found {len(flat)}"]
        problems = []
        for t, want in zip(flat, self.inputs):
            if t.dim() != len(want["dims"]):
                problems.append(f"{want['name']}: expected {len(want['dims'])} dims, found shape {tuple(t.shape)}")
                continue
            for i, (n, (lo, hi)) in enumerate(zip(t.shape, want["dims"])):
                if n < lo or (hi is not None and n > hi):
                    bound = str(lo) if lo == hi else f"{lo}..{'' if hi is None else hi}"
                    problems.append(f"{want['name']}.shape[{i}]: expected {bound}, found {n}")
        return problems

    def constant_fqns(self) -> list[str]:
        return list(self.runner.get_constant_fqns())

    def swap(self, adapters: Adapter | Sequence[Adapter]) -> None:
        """Load ``adapters`` into the package (no rebuild).

        Raises:
            SwapError: listing every module the package lacks, a rank above its budget, a shape
                or dtype that differs from what it was built with; nothing is loaded then.
        """
        adapters = as_adapters(adapters)
        self._load(adapters, self.multiplier, self.enabled)
        self.adapters = adapters

    def set_scale(self, scale: float) -> None:
        """Multiply every adapter's scale by ``scale`` (0 runs the base model)."""
        self._load(self._current(), float(scale), self.enabled)
        self.multiplier = float(scale)

    def disable(self) -> None:
        """Run the base model until ``enable``."""
        self._load(self._current(), self.multiplier, False)
        self.enabled = False

    def enable(self) -> None:
        self._load(self._current(), self.multiplier, True)
        self.enabled = True

    def _current(self) -> list[Adapter]:
        if self.adapters is None:
            raise SwapError("the package's adapter is the one it was built with; swap an adapter in first to "
                            "change its scale (lora_fx.load_package(path, adapters) names it)")
        return self.adapters

    def _load(self, adapters: list[Adapter], multiplier: float, enabled: bool) -> None:
        aset = AdapterSet(adapters)
        problems = self.layout.problems(aset, self.mode)
        problems += [f"{fqn}: expected LoRA tensors in {self.layout.specs[fqn].dtype}, found {w.lora_a.dtype} "
                     "(the package's constants have one dtype; cast the adapter with load_adapter(dtype=...))"
                     for fqn, ws in aset.modules[0].items() if fqn in self.layout.specs
                     for w in ws[:1] if w.lora_a.dtype != self.layout.specs[fqn].dtype]
        problems += [f"{fqn}: DoRA in a package is not supported" for fqn, ws in aset.modules[0].items()
                     if any(w.magnitude is not None for w in ws)]
        raise_if(problems, SwapError, "cannot load this adapter into the package (it still runs the previous one):")
        m = multiplier if enabled else 0.0
        tensors = self._tensors(aset, m)
        raise_if(self._check(tensors), SwapError, "cannot load these constants into the package:")
        self.runner.load_constants(tensors, check_full_update=False)

    def _tensors(self, aset: AdapterSet, m: float) -> dict[str, torch.Tensor]:
        out = {}
        for fqn, spec in self.layout.specs.items():
            ws = aset.weights(0, fqn) if m else []
            if self.mode == "fold":
                w, b = self.base[f"{fqn}.weight"], self.base.get(f"{fqn}.bias")
                fresh = fold_tensors(ws, self.kinds[fqn], w, b, m, spec.groups)
                out[constant_name(fqn, "weight")] = fresh["weight"]
                continue
            a, b = padded_ab(ws, self.rank, spec.shape, spec.kernel, spec.dtype, spec.embedding)
            scale = rank_scale(ws, self.rank, m, spec.dtype)  # folded into B (see export)
            out[constant_name(fqn, "lora_a")], out[constant_name(fqn, "lora_b")] = a, b * _over_ranks(scale, spec)
        return {k: v.contiguous() for k, v in out.items()}

    def _check(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Every constant the package was built with, with its shape and dtype, and nothing else."""
        p = [f"{k}: the package has no such constant" for k in tensors if k not in self.constants]
        for name, want in self.constants.items():
            t = tensors.get(name)
            if t is None:
                p.append(f"{name}: expected a value for this constant, found none")
            elif list(t.shape) != want["shape"] or str(t.dtype).removeprefix("torch.") != want["dtype"]:
                p.append(f"{name}: expected shape {want['shape']} {want['dtype']}, found {list(t.shape)} "
                         f"{str(t.dtype).removeprefix('torch.')}")
        return p


def _over_ranks(scale: torch.Tensor, spec: ModuleSpec) -> torch.Tensor:
    """The per-rank scale (R,) shaped to multiply B along its rank dim ((out, R) or (out, R, *1))."""
    return scale.view(-1, *(1,) * len(spec.kernel))


def _import_output_types(runner: Any) -> None:
    """Import the modules of the output's pytree node types (a transformers ModelOutput registers
    itself on import), so the package's outputs unflatten in a process that has not imported them."""
    import contextlib
    import importlib
    import re

    for qualified in set(re.findall(r'"type": "([\w.]+)\.\w+"', runner.loader.get_call_spec()[1])):
        with contextlib.suppress(ImportError):
            importlib.import_module(qualified)


def load_package(path: str | os.PathLike, adapters: Adapter | Sequence[Adapter] | None = None) -> LoraPackage:
    """Load a package made by :func:`export` (``adapters``: the ones it was built with, for
    ``set_scale`` / ``disable`` before any swap)."""
    return LoraPackage(path, None if adapters is None else as_adapters(adapters))
