"""Quantized base weights: what format a module's weight is in, and its (out, in) shape.

lora_fx never imports bitsandbytes or torchao to recognise their weights (by type). Branch mode
works over any module whose forward is a linear map of its input (the update is added at the
module's output); fold mode needs ``W + delta``, which no quantized format has, so it is refused,
unless the user opts in to requantizing a torchao weight (:func:`requantized`).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def quant_format(weight: object) -> str | None:
    """A readable name of ``weight``'s quantized format, or None for a plain (dense) tensor.

    bitsandbytes: ``Params4bit`` (NF4 / FP4, with its quant_state) and ``Int8Params``;
    torchao: any tensor subclass (``Int8Tensor``, ``NF4Tensor``, ``Float8Tensor``, ...).
    """
    if not isinstance(weight, torch.Tensor):
        return None
    if hasattr(weight, "device_mesh") and hasattr(weight, "to_local"):  # a DTensor: sharded, not quantized
        return quant_format(weight.to_local())
    cls = type(weight).__name__
    if cls == "Params4bit":
        state = getattr(weight, "quant_state", None)
        kind = getattr(state, "quant_type", None) or getattr(weight, "quant_type", "4-bit")
        return f"bitsandbytes {kind} (Params4bit)"
    if cls == "Int8Params":
        return "bitsandbytes int8 (Int8Params)"
    sub = next((type(t) for t in (weight.data, weight) if is_traceable_wrapper_subclass(t)), None)
    return None if sub is None else f"{sub.__module__.split('.')[0]} {sub.__name__}"


def module_format(module: torch.nn.Module) -> str | None:
    """The quantized format of ``module``'s weight (None: dense)."""
    return quant_format(getattr(module, "weight", None))


def out_in(module: torch.nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or Conv1D module's map, from its attributes: a quantized weight may be
    stored packed (bitsandbytes 4-bit: (out * in / 2, 1) bytes), so its shape does not tell."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    w = module.weight  # transformers Conv1D stores (in, out)
    return w.shape[1], w.shape[0]


def requantized(weight: torch.Tensor, config: object) -> torch.Tensor:
    """``weight`` (dense, (out, in)) quantized with the torchao ``config``, as torchao's ``quantize_``
    quantizes a Linear's weight (and as PEFT re-quantizes a merged torchao weight)."""
    from torchao.quantization import quantize_

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(linear, config)
    return linear.weight
