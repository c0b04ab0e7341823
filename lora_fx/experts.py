"""LoRA on fused 3-D expert parameters (transformers 5 mixture-of-experts), as PEFT applies it.

transformers 5 keeps a MoE layer's experts in one module whose parameters are 3-D: Mixtral's and
Qwen3-MoE's ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), expert e computing
``x @ W[e]^T``. PEFT adapts them with ``target_parameters`` (its ``ParamWrapper``, peft 0.21): for a
parameter W (E, out, in) (``is_transposed=False``, the layout above) it holds

    lora_A.weight  (r * E, in)      rows e * r .. e * r + r - 1 are expert e's A_e (r, in)
    lora_B.weight  (out, r * E)     column k * E + e is column k of expert e's B_e (out, r)

that is ``A_e = lora_A.reshape(E, r, in)[e]`` and ``B_e = lora_B.reshape(out, r, E)[:, :, e]``, and
its forward reads, at every call, the parameter

    W'[e] = W[e] + scale * B_e @ A_e        scale = alpha / r (alpha / sqrt(r) with rsLoRA)

(one ``baddbmm`` over the experts), so each token routed to expert e gets
``x W[e]^T + scale * (x A_e^T) B_e^T``. No dropout, DoRA or lora_bias. r and alpha come from
rank_pattern / alpha_pattern matched against the parameter's full name (``...experts.gate_up_proj``).

Keys on disk: ``<experts fqn>.lora_A.weight``. Several parameters of one module nest wrappers, one
per parameter in the module's registration order: the last one's keys are ``<fqn>.lora_A.weight``,
the one before ``<fqn>.base_layer.lora_A.weight``, and so on. An adapter does not record that
order; the loader takes transformers' (``gate_up_proj`` / ``up_proj`` / ``gate_proj`` before
``down_proj``) and :func:`expert_problems` checks it against the model.

lora_fx keys such a LoRA by the parameter's full name (``LoraWeights.experts`` = E). Fold mode
folds it into W' (``grouped_mm`` and ``batched_mm`` read the parameter inside the compiled graphs).
Branch mode holds A (E, R, in) and B (E, out, R) (:func:`padded_expert_ab`) and adds
``(x A_e^T) B_e^T * scale`` to the rows routed to expert e only, inside ``batched_mm``'s bmm and
``grouped_mm``'s grouped matmul (see :mod:`lora_fx.passes.experts`). transformers' eager loop
never reaches a graph (dynamo breaks at its ``nonzero``): it runs eagerly, each of its per-expert
``linear``s given the update there (:mod:`lora_fx.eager_experts`). Mixed-adapter batches are
refused (:func:`mixed_problems`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# the registration order of transformers' expert parameters (nested PEFT wrappers follow it)
ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
BASE = ".base_layer"


def unnested(key: str) -> tuple[str, int]:
    """A PEFT key path without its trailing ``.base_layer`` parts, and how many there were."""
    depth = 0
    while key.endswith(BASE):
        key, depth = key[: -len(BASE)], depth + 1
    return key, depth


def ordered(names: set[str]) -> list[str]:
    """Parameter names in the order transformers registers them (unknown names after, sorted)."""
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (r * E, in) / (out, r * E) pair as per-expert A (E, r, in) and B (E, out, r)."""
    a = lora_a.reshape(experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1, experts).permute(2, 0, 1)
    return a, b


def expert_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int, scale: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scale * B_e @ A_e for every expert: (E, out, in), the layout of the parameter."""
    a, b = expert_factors(lora_a.to(dtype), lora_b.to(dtype), experts)
    return scale * torch.bmm(b, a)


def expert_problems(path: str, rank: int, experts: int, modules: dict[str, torch.nn.Module]) -> list[str]:
    """What keeps a 3-D expert LoRA on parameter ``path`` from matching PEFT on this model."""
    fqn, _, name = path.rpartition(".")
    mod = modules.get(fqn)
    if mod is None:
        return [f"{path}: adapter has expert LoRA tensors for it, the model has no module {fqn!r}"]
    p = getattr(mod, name, None)
    if not isinstance(p, torch.Tensor) or p.dim() != 3:
        found = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        return [f"{path}: adapter holds LoRA for {experts} experts (lora_A of {rank * experts} rows = rank {rank} x "
                f"{experts}), expected a 3-D (experts, out, in) parameter, found {found}"]
    problems = []
    if getattr(mod, "is_transposed", False):
        problems.append(f"{path}: {type(mod).__name__} stores its experts transposed (is_transposed=True, "
                        "(experts, in, out)), an expert layout lora_fx does not support; expected (experts, out, in) "
                        "as Mixtral / Qwen3-MoE store it")
    if p.shape[0] != experts:
        problems.append(f"{path}: expected {p.shape[0]} experts' LoRA (lora_A of {rank * p.shape[0]} rows for rank "
                        f"{rank}), found {experts}")
    return problems


def nesting_problems(paths: dict[str, str], modules: dict[str, torch.nn.Module]) -> list[str]:
    """Expert LoRA keys whose nesting depth does not give their parameter in the model's
    registration order (``paths``: parameter path -> PEFT key path)."""
    by_module: dict[str, list[tuple[int, str]]] = {}
    for path, key in paths.items():
        fqn, _, name = path.rpartition(".")
        by_module.setdefault(fqn, []).append((unnested(key)[1], name))
    problems = []
    for fqn, found in by_module.items():
        mod = modules.get(fqn)
        if mod is None:
            continue
        order = [n for n, _ in mod.named_parameters(recurse=False) if n in {name for _, name in found}]
        want = {name: len(order) - 1 - i for i, name in enumerate(order)}  # the last one is outermost
        for depth, name in found:
            if want.get(name, depth) != depth:
                problems.append(f"{fqn}.{name}: PEFT nests one wrapper per parameter in the module's registration "
                                f"order ({order}), so its keys are at depth {want[name]} (.base_layer x "
                                f"{want[name]}); the adapter was read with them at depth {depth}")
    return problems


def padded_expert_ab(ws: list, rank: int, experts: int, shape: tuple[int, int],
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch mode's A (E, R, in) and B (E, out, R) of the summed expert LoRAs ``ws``, side by side
    along the rank and zero-padded to ``rank``; ``shape``: (out, in)."""
    out_f, in_f = shape
    a, b = torch.zeros(experts, rank, in_f, dtype=dtype), torch.zeros(experts, out_f, rank, dtype=dtype)
    at = 0
    for w in ws:
        a[:, at:at + w.rank], b[:, :, at:at + w.rank] = expert_factors(w.lora_a, w.lora_b, experts)
        at += w.rank
    return a, b


def peft_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`expert_factors`: per-expert A (E, r, in) and B (E, out, r) as PEFT's
    lora_A (r * E, in) and lora_B (out, r * E)."""
    experts, rank = a.shape[:2]
    return a.reshape(experts * rank, a.shape[-1]), b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)


def mixed_problems(specs: dict) -> list[str]:
    """Mixed-adapter batches with LoRA on 3-D expert parameters: refused (each row would need its
    own adapter's A_e / B_e gathered per routed row; lora_fx does not build that yet)."""
    return [f"{fqn}: LoRA on a 3-D expert parameter ({spec.experts} experts) in a mixed-adapter batch: lora_fx "
            "applies expert LoRA for one adapter per batch; serve one adapter per batch (swap), or leave the expert "
            "parameters out of the adapters you mix"
            for fqn, spec in specs.items() if getattr(spec, "experts", 0)]


def expert_keys(config, keys: set[str], rows: dict[str, int],
                entry_modules: Callable[[str, set[str]], set[str]]) -> dict[str, tuple[str, int]]:
    """PEFT key path -> (the expert parameter's full name, E) for the keys of ``keys`` that hold
    LoRA on a 3-D expert parameter: a ``target_parameters`` entry names the parameter, and its
    lora_A has E * r rows (``rows``) for E > 1, r its configured rank. Nested keys
    (``<fqn>.base_layer``) get their parameter from the depth (see the module's docstring)."""
    from . import targets

    bases: dict[str, list[tuple[int, str]]] = {}
    for key in keys:
        base, depth = unnested(key)
        bases.setdefault(base, []).append((depth, key))
    out: dict[str, tuple[str, int]] = {}
    for base, found in bases.items():
        names = ordered({e.rpartition(".")[2] for e in config.target_parameters or () if entry_modules(e, {base})})
        for depth, key in found:
            if depth >= len(names):
                continue
            path = f"{base}.{names[len(names) - 1 - depth]}"
            r = targets.rank_of(config, path)
            n = rows.get(key, 0)
            if r and n % r == 0 and n // r > 1:
                out[key] = (path, n // r)
    return out


def module_of(fqn: str, spec: object) -> str:
    """The module fqn of a layout entry: an expert parameter's entry is the parameter's full name."""
    return fqn.rpartition(".")[0] if getattr(spec, "experts", 0) else fqn


# experts implementations lora_fx applies expert LoRA to: the eager loop runs eagerly (see
# lora_fx.eager_experts), grouped_mm / batched_mm inside the compiled graphs (lora_fx.passes.experts)
SUPPORTED = ("eager", "grouped_mm", "batched_mm")


def implementation(mod: torch.nn.Module | None) -> str | None:
    """The experts implementation a transformers experts module computes with (None: not known)."""
    return getattr(getattr(mod, "config", None), "_experts_implementation", None)


def implementation_problems(specs: dict, modules: dict[str, torch.nn.Module]) -> list[str]:
    """Expert parameters whose module computes with an experts implementation lora_fx has not
    verified (a kernel of its own, e.g. ``deepgemm``); a module with no implementation set runs
    its own forward, read as the eager loop is."""
    out = []
    for fqn, spec in specs.items():
        mod = modules.get(module_of(fqn, spec)) if getattr(spec, "experts", 0) else None
        impl = implementation(mod)
        if mod is not None and impl is not None and impl not in SUPPORTED:
            out.append(f"{fqn}: {type(mod).__name__} computes with experts implementation {impl!r}, which lora_fx "
                       f"has not verified to read the parameter where the adapter reaches it; expected one of "
                       f"{list(SUPPORTED)}: call model.set_experts_implementation('grouped_mm') before compiling")
    return out
