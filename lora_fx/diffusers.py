"""LoRA files as diffusers loads them, for a diffusers model (UNet, DiT transformer).

``load_diffusers_lora(model, path_or_dict)`` takes what ``pipe.load_lora_weights`` takes (a
directory, a file, a hub repo in the local cache, a state dict; diffusers' own PEFT-format files
and the community formats its loaders convert, kohya / xlabs / ...), reads it with the pipeline
loader's ``lora_state_dict`` (diffusers' converters, not ours), keeps the model's component
(``unet.`` / ``transformer.`` keys) and builds the LoRA config as diffusers'
``load_lora_adapter`` does: from the file's adapter metadata when it has some, else from the
ranks and the network alphas with ``get_peft_kwargs``. diffusers is an optional dependency.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapter import PREFIX, Adapter
from .config import LoraConfig
from .errors import AdapterConfigError
from .loading import build_adapter

# model class -> (diffusers loader mixin, the component's key prefix), as diffusers' pipelines pair them
LOADERS = {
    "UNet2DConditionModel": ("StableDiffusionLoraLoaderMixin", "unet"),
    "SD3Transformer2DModel": ("SD3LoraLoaderMixin", "transformer"),
    "FluxTransformer2DModel": ("FluxLoraLoaderMixin", "transformer"),
}


def _loader(model: torch.nn.Module, loader: Any, prefix: str | None) -> tuple[Any, str]:
    from diffusers import loaders

    if loader is not None:
        name = getattr(loader, "unet_name", None) if prefix is None else prefix
        return loader, name or getattr(loader, "transformer_name", "transformer")
    known = LOADERS.get(type(model).__name__)
    if known is None:
        raise AdapterConfigError(
            f"{type(model).__name__}: no default diffusers LoRA loader for this model; pass loader= (the pipeline "
            f"class or its LoraLoaderMixin, e.g. diffusers.FluxPipeline) and prefix= (known: {sorted(LOADERS)})")
    return getattr(loaders, known[0]), prefix or known[1]


def load_diffusers_lora(model: torch.nn.Module, pretrained_model_name_or_path_or_dict: Any, *, loader: Any = None,
                        prefix: str | None = None, scale: float = 1.0, dtype: torch.dtype | None = None,
                        name: str | None = None, **kwargs: Any) -> Adapter:
    """A LoRA for ``model`` (a diffusers UNet / transformer) from what ``pipe.load_lora_weights`` takes.

    Args:
        model: the component the LoRA applies to (its state dict sizes the config, as diffusers does).
        pretrained_model_name_or_path_or_dict: a directory, a file path, a hub repo id in the local
            cache, or a state dict, in diffusers' format or a community format its loader converts.
        loader: the pipeline class (or its LoraLoaderMixin) whose ``lora_state_dict`` reads the
            file; default from the model's class (UNet2DConditionModel: Stable Diffusion's;
            SD3Transformer2DModel; FluxTransformer2DModel).
        prefix: the component's key prefix ("unet", "transformer"); default the loader's.
        scale, name: as :func:`lora_fx.load_adapter`.
        dtype: the LoRA tensors' dtype; default the model's, as diffusers casts them to the layers'
            (a fp16 file on a fp32 model computes in fp32, a fp32 file on a fp16 model in fp16).
        kwargs: passed to ``lora_state_dict`` (``weight_name=``, ``subfolder=``, ...).

    Raises:
        AdapterConfigError / AdapterWeightsError: as ``load_adapter``; no tensors for the component.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs

    loader, prefix = _loader(model, loader, prefix)
    source = pretrained_model_name_or_path_or_dict
    if isinstance(source, dict):
        source = dict(source)  # diffusers' converters pop the keys they convert
    out = loader.lora_state_dict(source, return_lora_metadata=True, **kwargs)
    state_dict, metadata = out[0], out[-1]
    alphas = out[1] if len(out) == 3 else None
    keep = f"{prefix}."
    state_dict = {k.removeprefix(keep): v for k, v in state_dict.items() if k.startswith(keep)}
    if not state_dict:
        raise AdapterConfigError(f"expected LoRA tensors for the {prefix!r} component, found none")
    if "lora_A" not in next(iter(state_dict)):
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    if metadata:
        metadata = {k.removeprefix(keep): v for k, v in metadata.items() if k.startswith(keep)}
    if metadata:
        config_kwargs = dict(metadata)
    else:
        ranks = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
        alphas = {k.removeprefix(keep): v for k, v in (alphas or {}).items() if k.startswith(keep)}
        config_kwargs = get_peft_kwargs(ranks, network_alpha_dict=alphas, peft_state_dict=state_dict,
                                        is_unet=True, model_state_dict=model.state_dict())
    config = LoraConfig.from_dict(_jsonable(config_kwargs), source=f"{prefix} LoRA config")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return build_adapter(config, {PREFIX + k: v for k, v in state_dict.items()}, scale=scale, dtype=dtype,
                         name=name or prefix, source=f"{prefix} LoRA")


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A config dict with sets as sorted lists (what adapter_config.json holds)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in kwargs.items()}
