"""A fresh adapter on a model: ``init_adapter`` with PEFT's default initialisation (the adapted
model equals the base model), ``random_adapter`` with values that change the outputs (for tests
and benchmarks).
"""

from __future__ import annotations

import math

import torch

from . import targets
from .adapter import Adapter, LoraWeights, adapter_dtype
from .checks import conv_problems
from .config import LoraConfig
from .errors import AdapterConfigError, raise_if
from .quantized import module_format, out_in
from .tensors import as_out_in


def init_adapter(model: torch.nn.Module, config: LoraConfig, *, seed: int | None = None,
                 dtype: torch.dtype | None = None, name: str | None = None) -> Adapter:
    """A fresh adapter on ``model`` with PEFT's default initialisation.

    A is Kaiming-uniform as nn.Linear's weight (a conv's: its kernel), B is zero (embeddings: A
    zero, B normal), the DoRA magnitude is the weight's row norm (per output) and lora_B's bias
    is zero, so the adapted model equals the base model until the adapter is trained. The tensors
    are in ``dtype``, else the module's weight dtype, fp32 for a bf16 / fp16 weight (as PEFT's
    get_peft_model: training updates are not rounded away).

    Raises:
        AdapterConfigError: a targeted module is not Linear / Conv1D / ConvNd / Embedding, or a
            conv PEFT's LoRA cannot express (see ``adapter.conv_problems``).
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    mods = dict(model.named_modules())
    weights: dict[str, LoraWeights] = {}
    problems: list[str] = []
    for fqn in targets.matched_modules(config, model):
        mod, r = mods[fqn], targets.rank_of(config, fqn)
        w = getattr(mod, "weight", None)
        kind = targets.module_kind(mod)
        if not isinstance(w, torch.Tensor) or kind is None:
            problems.append(f"{fqn}: expected nn.Linear, Conv1D, nn.Conv1d / 2d / 3d or nn.Embedding, "
                            f"found {type(mod).__name__}")
            continue
        # a packed quantized weight (bitsandbytes: uint8) computes in the module's compute dtype
        # (bf16 / fp16: fp32, as PEFT's get_peft_model creates them)
        dt = adapter_dtype(dtype, w.dtype if w.dtype.is_floating_point
                           else getattr(mod, "compute_dtype", None) or torch.float32)
        scale = targets.scale_of(config, fqn)
        fmt = module_format(mod)
        if fmt is not None and config.use_dora:
            problems.append(f"{fqn}: DoRA over a quantized weight ({fmt}) is not supported; use plain LoRA")
            continue
        mag = as_out_in(w, kind).detach().float().norm(dim=1).to(dt) if config.use_dora else None
        if isinstance(mod, torch.nn.Embedding):
            a = torch.zeros(r, mod.num_embeddings, dtype=dt)
            b = torch.randn(mod.embedding_dim, r, generator=gen).to(dt)
            weights[fqn] = LoraWeights(a, b, scale, mag, embedding=True)
            continue
        if kind == "conv":
            bad = conv_problems(fqn, mod, r)
            problems += bad
            if bad:
                continue
            ones = (1,) * len(mod.kernel_size)
            a_shape, b_shape = (r, mod.in_channels, *mod.kernel_size), (mod.out_channels, r // mod.groups, *ones)
            mag = None if mag is None else mag.view(1, -1, *ones)
        else:
            out_f, in_f = out_in(mod)  # from the module: a quantized weight may be stored packed
            a_shape, b_shape = (r, in_f), (out_f, r)
        a = torch.empty(a_shape)
        bound = 1 / math.sqrt(a[0].numel())  # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        a.uniform_(-bound, bound, generator=gen)
        b = torch.zeros(b_shape, dtype=dt)
        bias = torch.zeros(b_shape[0], dtype=dt) if config.lora_bias else None
        weights[fqn] = LoraWeights(a.to(dt), b, scale, mag, bias)
    raise_if(problems, AdapterConfigError, "cannot initialise the adapter:")
    if not weights:
        raise AdapterConfigError(f"target_modules {config.target_modules!r}: expected to match modules, matched none")
    return Adapter(config, weights, name=name)


def random_adapter(model: torch.nn.Module, config: LoraConfig, seed: int = 0, std: float = 0.3) -> Adapter:
    """``init_adapter`` on ``model``, then every tensor given non-trivial values (B non-zero,
    DoRA magnitudes away from the weight norms), so the adapter changes the outputs."""
    adapter = init_adapter(model, config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for w in adapter.modules.values():
            for t in (w.lora_a, w.lora_b, w.bias):
                if t is not None:
                    t.add_(std * torch.randn(t.shape, generator=gen, dtype=t.dtype))
            if w.magnitude is not None:
                w.magnitude.mul_(1 + 0.5 * torch.rand(w.magnitude.shape, generator=gen, dtype=w.magnitude.dtype))
    return adapter
