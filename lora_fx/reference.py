"""Eager LoRA with PEFT's exact math: the oracle the graph passes are tested against.

``apply_lora(model, adapters)`` hooks the targeted modules for the duration of a ``with`` block and
restores the model exactly on exit. It is deliberately simple and slow: one hook per module,
nothing cached, every formula written as PEFT's LoRA layers compute it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from .adapter import Adapter, LoraWeights, as_adapters, combined_modules, combined_overrides, model_problems
from .errors import ModelMismatchError, raise_if
from .targets import is_module_copy, module_kind
from .tensors import fold_tensors


def _linear_hook(module: torch.nn.Module, weights: list[LoraWeights]):
    conv1d = not isinstance(module, torch.nn.Linear)  # transformers Conv1D: weight stored (in, out)

    def hook(mod: torch.nn.Module, args: tuple[Any, ...], result: torch.Tensor) -> torch.Tensor:
        x, out_dtype = args[0], result.dtype
        for w in weights:
            xa = x.to(w.lora_a.dtype)
            lora = F.linear(F.linear(xa, w.lora_a), w.lora_b, w.bias)  # (..., out): B A x + b_B
            if w.magnitude is None:
                result = result + lora * w.scale
                continue
            # DoRA, as PEFT's DoraLinearLayer: norm of W + s B A per output row, detached.
            weight = mod.weight.T if conv1d else mod.weight  # (out, in)
            merged = weight + w.scale * (w.lora_b @ w.lora_a).to(weight.dtype)
            norm = torch.linalg.norm(merged, dim=1).to(weight.dtype).detach()
            mag_norm_scale = (w.magnitude / norm).view(1, -1)
            base = result if mod.bias is None else result - mod.bias
            result = result + (mag_norm_scale - 1) * base + mag_norm_scale * lora * w.scale
        return result.to(out_dtype)

    return hook


def _embedding_hook(weights: list[LoraWeights]):
    def hook(mod: torch.nn.Embedding, args: tuple[Any, ...], result: torch.Tensor) -> torch.Tensor:
        out_dtype = result.dtype
        for w in weights:
            after_a = F.embedding(args[0], w.lora_a.T, mod.padding_idx, mod.max_norm, mod.norm_type,
                                  mod.scale_grad_by_freq, mod.sparse)  # (..., r)
            lora = (after_a @ w.lora_b.T) * w.scale
            if w.magnitude is None:
                result = result + lora
                continue
            # DoRA, as PEFT's DoraEmbeddingLayer: norm of W^T + s B A per embedding dim, detached.
            merged = mod.weight.T + w.scale * (w.lora_b @ w.lora_a)  # (dim, vocab)
            mag_norm_scale = w.magnitude / torch.linalg.norm(merged, dim=1).to(merged.dtype).detach()
            result = mag_norm_scale * result + mag_norm_scale * lora
        return result.to(out_dtype)

    return hook


def _conv_hook(weights: list[LoraWeights]):
    def hook(mod: torch.nn.Module, args: tuple[Any, ...], result: torch.Tensor) -> torch.Tensor:
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[mod.weight.dim()]
        out_dtype = result.dtype
        for w in weights:
            x = args[0].to(w.lora_a.dtype)
            # PEFT's lora_B(lora_A(x)): A with the base's kernel, stride and padding; B 1x1 with its groups
            lora = conv(conv(x, w.lora_a, None, mod.stride, mod.padding), w.lora_b, w.bias, groups=mod.groups)
            if w.magnitude is None:
                result = result + lora * w.scale
                continue
            # DoRA, as PEFT's _DoraConvNdLayer: B.view(-1, r) @ A.view(r, -1) in the weight's shape
            lora_weight = (w.lora_b.reshape(-1, w.rank) @ w.lora_a.reshape(w.rank, -1)).reshape(mod.weight.shape)
            merged = mod.weight + w.scale * lora_weight
            norm = merged.norm(p=2, dim=tuple(range(1, merged.dim())), keepdim=True).transpose(1, 0).detach()
            mag_norm_scale = w.magnitude / norm  # (1, out, *1)
            base = result
            if mod.bias is not None:
                base = result - mod.bias.view(1, -1, *(1,) * (result.dim() - 2))
            result = result + (mag_norm_scale - 1) * base + mag_norm_scale * lora * w.scale
        return result.to(out_dtype)

    return hook


def _merge_params_around(model: torch.nn.Module, entries: list[tuple[torch.nn.Module, list[LoraWeights]]]) -> list:
    """LoRA on parameters, as PEFT's ParamWrapper and MultiheadAttention apply it: for each call
    of the model, the parameter is W + scale * B A (differentiable); the originals come back after."""
    held: list[tuple[torch.nn.Module, str, Any]] = []

    def pre(_mod: torch.nn.Module, _args: Any) -> None:
        for mod, ws in entries:
            name = ws[0].param
            orig = mod._parameters[name]
            held.append((mod, name, orig))
            merged = orig
            for w in ws:
                w = w.to(orig.device)
                merged = merged + ((w.lora_b @ w.lora_a) * w.scale).to(orig.dtype)
            mod._parameters[name] = merged

    def post(_mod: torch.nn.Module, _args: Any, _out: Any) -> None:
        while held:
            mod, name, orig = held.pop()
            mod._parameters[name] = orig

    return [model.register_forward_pre_hook(pre), model.register_forward_hook(post, always_call=True)]


@contextmanager
def apply_lora(model: torch.nn.Module, adapters: Adapter | Sequence[Adapter]) -> Iterator[torch.nn.Module]:
    """Run ``model`` with ``adapters`` (summed) applied, PEFT's math, inside the block.

    Parameters named in the adapters' overrides (modules_to_save, saved biases) are replaced for
    the block's duration and restored on exit, as are the forward hooks.

    Raises:
        ModelMismatchError: the adapters do not fit the model (see ``Adapter.check``).
    """
    from .eager import suspended

    adapters = as_adapters(adapters)
    per_module = combined_modules(adapters)
    problems = [p for a in adapters for p in model_problems(a, model) if "the config targets" not in p]
    raise_if(problems, ModelMismatchError, "adapters do not fit the model:")
    mods = dict(model.named_modules())
    saved: list[tuple[torch.nn.Module, str, Any]] = []
    handles = []
    try:
        for path, t in combined_overrides(adapters).items():
            mod_path, _, name = path.rpartition(".")
            mod = mods[mod_path]
            if name in mod._parameters:
                old = mod._parameters[name]
                saved.append((mod, name, old))
                mod._parameters[name] = torch.nn.Parameter(t.to(old.device, old.dtype), requires_grad=old.requires_grad)
            else:
                old = mod._buffers[name]
                saved.append((mod, name, old))
                mod._buffers[name] = t.to(old.device, old.dtype)
        merged_params = [(mods[fqn], ws) for fqn, ws in per_module.items() if ws[0].param is not None]
        if merged_params:
            handles += _merge_params_around(model, merged_params)
        for fqn, ws in per_module.items():
            if ws[0].param is not None:
                continue
            mod = mods[fqn]
            ws = [w.to(mod.weight.device) for w in ws]
            kind = module_kind(mod)
            hook = (_embedding_hook(ws) if kind == "embedding" else _conv_hook(ws) if kind == "conv"
                    else _linear_hook(mod, ws))
            handles.append(mod.register_forward_hook(hook))
        with suspended():  # a backend's eager guard on the same model: this block applies the adapters itself
            yield model
    finally:
        for h in handles:
            h.remove()
        for mod, name, old in reversed(saved):
            if name in mod._parameters:
                mod._parameters[name] = old
            else:
                mod._buffers[name] = old


def lora_forward(model: torch.nn.Module, adapters: Adapter | Sequence[Adapter], *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with ``adapters`` applied; the model is unchanged afterwards."""
    with apply_lora(model, adapters):
        return model(*args, **kwargs)


def merged_state_dict(model: torch.nn.Module, adapters: Adapter | Sequence[Adapter]) -> dict[str, torch.Tensor]:
    """The model's state dict with the adapters merged in (PEFT's merge_and_unload, without PEFT)."""
    adapters = as_adapters(adapters)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = {n: ns for ns in names.values() if len(ns) > 1 for n in ns}
    changed = [*(path for a in adapters for path in a.overrides if is_module_copy(a.config, path)),
               *(f"{fqn}.{ws[0].param or 'weight'}" for fqn, ws in combined_modules(adapters).items())]
    raise_if([f"{k}: is also {[n for n in tied[k] if n != k]} (tied weights); a merged checkpoint holds one "
              "tensor for them, so the update would reach every module that reads it, or be lost when the "
              "model ties them again on loading" for k in changed if k in tied], ModelMismatchError,
             "cannot merge into tied weights (serve with lora_fx.backend, or untie them first):")
    mods = dict(model.named_modules())
    raise_if([f"{fqn}: expected a module of that name in the model, found none" for fqn in
              combined_modules(adapters) if fqn not in mods], ModelMismatchError, "cannot merge the adapter:")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd.update({k: v.to(sd[k].dtype) for k, v in combined_overrides(adapters).items() if k in sd})
    for fqn, ws in combined_modules(adapters).items():
        mod = mods[fqn]
        kind = "param" if ws[0].param is not None else module_kind(mod)
        if kind == "conv" and mod.groups > 1:
            raise ModelMismatchError(f"{fqn}: groups={mod.groups}: B A mixes the groups, so it cannot be merged "
                                     "into the grouped kernel (PEFT refuses to merge it too)")
        weight_key, bias_key = f"{fqn}.{ws[0].param or 'weight'}", f"{fqn}.bias"
        merged = fold_tensors(ws, kind, sd[weight_key], sd.get(bias_key))
        sd[weight_key] = merged["weight"]
        if "bias" in merged:
            if bias_key not in sd:
                raise ModelMismatchError(f"{fqn}: lora_bias needs a base bias to merge into, found none")
            sd[bias_key] = merged["bias"]
    return sd
