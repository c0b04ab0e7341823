"""From a model PEFT holds adapters in to a base model and lora_fx adapters: ``from_peft``.

A ``PeftModel`` (``get_peft_model``, ``PeftModel.from_pretrained``) or a transformers model given
adapters by its PEFT integration (``model.load_adapter``) keeps its LoRA layers in place: each
targeted module is a PEFT layer holding ``base_layer`` and ``lora_A`` / ``lora_B`` per adapter.
``from_peft`` reads every adapter PEFT holds (its config, its tensors in PEFT's saved form, the
scale it runs at now) into lora_fx ``Adapter`` objects, in memory, then puts each base layer back in
its PEFT layer's place: unloaded, not merged, so the base weights are exactly the model's.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapter import PREFIX
from .config import LoraConfig
from .errors import AdapterConfigError


class PeftAdapters(dict):
    """name -> Adapter, every adapter the PEFT model held; ``active``: the names PEFT had active
    (several are summed: pass ``[adapters[n] for n in adapters.active]`` to ``lora_fx.backend``)."""

    active: list[str]


def peft_layers(model: torch.nn.Module) -> list[str]:
    """The names of the PEFT LoRA layers ``model`` holds (a module with ``base_layer`` and ``lora_A``)."""
    return [name for name, m in model.named_modules()
            if hasattr(m, "base_layer") and isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]


def _scale_multiplier(model: torch.nn.Module, name: str, config: LoraConfig) -> float:
    """The multiplier PEFT runs adapter ``name`` at now (``scale_layer`` / diffusers' weights):
    its layers' scaling over the config's, read from the first layer that has it."""
    from .targets import scale_of

    for fqn, m in model.named_modules():
        scaling = getattr(m, "scaling", None)
        if isinstance(scaling, dict) and name in scaling and hasattr(m, "base_layer"):
            fqn = fqn.removeprefix("base_model.model.")
            want = scale_of(config, fqn, 1.0)
            return float(scaling[name]) / want if want else 1.0
    return 1.0


def from_peft(peft_model: Any) -> tuple[torch.nn.Module, PeftAdapters]:
    """``model, adapters = lora_fx.from_peft(peft_model)``: the base model with PEFT's layers removed
    (unloaded, not merged) and every adapter PEFT held, as lora_fx Adapters by name.

    Args:
        peft_model: a ``peft.PeftModel``, or a transformers model given adapters by its PEFT
            integration (``model.load_adapter(...)``).

    Returns:
        The base model (the same module objects; its weights untouched) and a ``PeftAdapters``
        mapping (``.active``: the adapters PEFT had active, each at the scale it ran at).

    Raises:
        AdapterConfigError: a model with no PEFT adapters, or an adapter lora_fx does not implement
            (named, as ``load_adapter`` names it).
    """
    from peft.utils import get_peft_model_state_dict

    from .loading import build_adapter

    configs = getattr(peft_model, "peft_config", None)
    if not configs:
        raise AdapterConfigError(f"{type(peft_model).__name__}: expected a PeftModel or a model with PEFT adapters "
                                 "(model.load_adapter), found none")
    active = getattr(peft_model, "active_adapters", None)
    active = list(active() if callable(active) else active or [next(iter(configs))])
    adapters = PeftAdapters()
    for name, peft_config in configs.items():
        data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.to_dict().items()}
        config = LoraConfig.from_dict(data, source=f"PEFT adapter {name!r}")
        tensors = get_peft_model_state_dict(peft_model, adapter_name=name)
        tensors = {k if k.startswith(PREFIX) else PREFIX + k: v.detach().clone() for k, v in tensors.items()}
        scale = _scale_multiplier(peft_model, name, config)
        adapters[name] = build_adapter(config, tensors, scale=scale, name=name, source=f"PEFT adapter {name!r}")
    adapters.active = active
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    _unload(base)
    return base, adapters


def _unload(model: torch.nn.Module) -> None:
    """Put each PEFT layer's base layer back in its place (modules_to_save wrappers: the original)."""
    for name in sorted(peft_layers(model), key=len, reverse=True):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, model.get_submodule(name).get_base_layer())
    for name, m in list(model.named_modules()):
        original = getattr(m, "original_module", None)
        if isinstance(original, torch.nn.Module) and hasattr(m, "modules_to_save"):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, original)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)
