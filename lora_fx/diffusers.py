"""LoRA files as diffusers loads them, for a diffusers pipeline or one of its models.

``load_diffusers_lora(pipe_or_model, path_or_dict)`` takes what ``pipe.load_lora_weights`` takes (a
directory, a file, a hub repo in the local cache, a state dict; diffusers' own PEFT-format files
and the community formats its loaders convert, kohya / xlabs / ...), reads it with the pipeline
loader's ``lora_state_dict`` (diffusers' converters, not ours) and builds each component's LoRA
config as diffusers' ``load_lora_adapter`` / ``load_lora_into_text_encoder`` do (``_create_lora_config``:
the file's adapter metadata when it has some, else the ranks and the network alphas). Given a
pipeline it returns every component the file holds (unet / transformer, text_encoder,
text_encoder_2, ...); given a model, that model's component, and it refuses a file holding other
components' tensors unless told to leave them out. diffusers is an optional dependency.
"""

from __future__ import annotations

import inspect
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
ATTENTION_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")  # carry "scale"
TEXT_ENCODER_LAYERS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")  # diffusers' rank keys


class PipelineLora(dict):
    """component name -> Adapter, every component a pipeline LoRA file holds (``unet``, ``text_encoder``...)."""


def is_pipeline(obj: Any) -> bool:
    """A diffusers pipeline with LoRA loading (``pipe.load_lora_weights``)."""
    return hasattr(obj, "_lora_loadable_modules") and hasattr(obj, "components")


def _loader(model: torch.nn.Module, loader: Any, prefix: str | None) -> tuple[Any, str]:
    from diffusers import loaders

    if loader is not None:
        name = getattr(loader, "unet_name", None) if prefix is None else prefix
        return loader, name or getattr(loader, "transformer_name", "transformer")
    known = LOADERS.get(type(model).__name__)
    if known is None:
        raise AdapterConfigError(
            f"{type(model).__name__}: no default diffusers LoRA loader for this model; pass loader= (the pipeline "
            f"class or its LoraLoaderMixin, e.g. diffusers.FluxPipeline) and prefix= (known: {sorted(LOADERS)}), "
            "or the pipeline itself (load_diffusers_lora(pipe, ...))")
    return getattr(loaders, known[0]), prefix or known[1]


def _read(loader: Any, source: Any, kwargs: dict[str, Any]) -> tuple[dict, dict | None, dict | None]:
    """(state dict, network alphas, metadata) as the loader reads them, component prefixes kept."""
    if isinstance(source, dict):
        source = dict(source)  # diffusers' converters pop the keys they convert
    out = loader.lora_state_dict(source, return_lora_metadata=True, **kwargs)
    return out[0], (out[1] if len(out) == 3 else None), out[-1]


def _components(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    found: dict[str, int] = {}
    for k in state_dict:
        found[k.partition(".")[0]] = found.get(k.partition(".")[0], 0) + 1
    return found


def load_diffusers_lora(pipe_or_model: Any, pretrained_model_name_or_path_or_dict: Any, *, loader: Any = None,
                        prefix: str | None = None, scale: float = 1.0, dtype: torch.dtype | None = None,
                        name: str | None = None, drop: tuple[str, ...] = (), **kwargs: Any) -> Adapter | PipelineLora:
    """The LoRA in what ``pipe.load_lora_weights`` takes, for a pipeline or one of its models.

    Args:
        pipe_or_model: a diffusers pipeline (every component the file holds is returned, as
            ``load_lora_weights`` loads them), or the model a LoRA applies to (a UNet / transformer;
            its state dict sizes the config, as diffusers does).
        pretrained_model_name_or_path_or_dict: a directory, a file path, a hub repo id in the local
            cache, or a state dict, in diffusers' format or a community format its loader converts.
        loader: a model only: the pipeline class (or its LoraLoaderMixin) whose ``lora_state_dict``
            reads the file; default from the model's class (UNet2DConditionModel: Stable
            Diffusion's; SD3Transformer2DModel; FluxTransformer2DModel).
        prefix: a model only: the component's key prefix ("unet", "transformer", "text_encoder").
        scale, name: as :func:`lora_fx.load_adapter` (a pipeline: the name of every component's).
        dtype: the LoRA tensors' dtype; default each model's, as diffusers casts them to the layers'
            (a fp16 file on a fp32 model computes in fp32, a fp32 file on a fp16 model in fp16).
        drop: components of the file to leave out knowingly (a model: the others' tensors).
        kwargs: passed to ``lora_state_dict`` (``weight_name=``, ``subfolder=``, ...).

    Returns:
        An Adapter for a model; a ``PipelineLora`` (component name -> Adapter) for a pipeline.

    Raises:
        AdapterConfigError / AdapterWeightsError: as ``load_adapter``; no tensors for the component;
            tensors for a component the pipeline lacks, or (a model) for other components.
    """
    if is_pipeline(pipe_or_model):
        return _load_pipeline(pipe_or_model, pretrained_model_name_or_path_or_dict, scale=scale, dtype=dtype,
                              name=name, drop=drop, **kwargs)
    model = pipe_or_model
    loader, prefix = _loader(model, loader, prefix)
    state_dict, alphas, metadata = _read(loader, pretrained_model_name_or_path_or_dict, kwargs)
    others = {c: n for c, n in _components(state_dict).items() if c != prefix and c not in drop}
    if others:
        raise AdapterConfigError(
            f"{type(model).__name__}: the LoRA file also holds tensors for {others} (component: tensor count), "
            f"which a {prefix!r} adapter would leave out; pass the pipeline (load_diffusers_lora(pipe, ...) or "
            f"lora_fx.compile_pipeline) to apply every component, or drop={tuple(others)} to take {prefix!r}'s only")
    return _component(model, prefix, state_dict, alphas, metadata, is_unet=not prefix.startswith("text_encoder"),
                      scale=scale, dtype=dtype, name=name or prefix)


def _load_pipeline(pipe: Any, source: Any, *, scale: float, dtype: torch.dtype | None, name: str | None,
                   drop: tuple[str, ...], **kwargs: Any) -> PipelineLora:
    loader = type(pipe)
    state_dict, alphas, metadata = _read(loader, source, kwargs)
    found = {c: n for c, n in _components(state_dict).items() if c not in drop}
    loadable = list(getattr(pipe, "_lora_loadable_modules", ()))
    problems = [f"{c}: {n} LoRA tensors for a component this pipeline ({loader.__name__}) "
                + ("does not have (it is None)" if c in loadable else f"does not load LoRAs into (it loads {loadable})")
                for c, n in found.items() if c not in loadable or getattr(pipe, c, None) is None]
    if problems:
        raise AdapterConfigError("cannot apply every part of the LoRA file to the pipeline (pass drop=(...) to "
                                 "leave a component out knowingly):\n  " + "\n  ".join(problems))
    if not found:
        raise AdapterConfigError(f"expected LoRA tensors for one of the pipeline's components {loadable}, found none")
    return PipelineLora({c: _component(getattr(pipe, c), c, state_dict, alphas, metadata,
                                       is_unet=not c.startswith("text_encoder"), scale=scale, dtype=dtype,
                                       name=name or c) for c in found})


def _component(model: torch.nn.Module, prefix: str, state_dict: dict, alphas: dict | None, metadata: dict | None,
               *, is_unet: bool, scale: float, dtype: torch.dtype | None, name: str) -> Adapter:
    """One component's Adapter, its config built as diffusers builds it for that component."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from diffusers.utils.peft_utils import _create_lora_config

    keep = f"{prefix}."
    state_dict = {k.removeprefix(keep): v for k, v in state_dict.items() if k.startswith(keep)}
    if not state_dict:
        raise AdapterConfigError(f"expected LoRA tensors for the {prefix!r} component, found none")
    metadata = {k.removeprefix(keep): v for k, v in (metadata or {}).items() if k.startswith(keep)} or None
    alphas = {k.removeprefix(keep): v for k, v in (alphas or {}).items() if k.startswith(keep)} or None
    if is_unet:
        if "lora_A" not in next(iter(state_dict)):
            state_dict = convert_unet_state_dict_to_peft(state_dict)
        ranks = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    else:  # as diffusers' _load_lora_into_text_encoder
        state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
        if not hasattr(model, "text_model"):
            state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
        ranks = {f"{n}.lora_B.weight": state_dict[f"{n}.lora_B.weight"].shape[1] for n, _ in model.named_modules()
                 if n.endswith(TEXT_ENCODER_LAYERS) and f"{n}.lora_B.weight" in state_dict}
    peft_config = _create_lora_config(state_dict, alphas, metadata, ranks, is_unet=is_unet,
                                      model_state_dict=model.state_dict() if is_unet else None)
    config = LoraConfig.from_dict(_jsonable(peft_config.to_dict()), source=f"{prefix} LoRA config")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return build_adapter(config, {PREFIX + k: v for k, v in state_dict.items()}, scale=scale, dtype=dtype,
                         name=name, source=f"{prefix} LoRA")


def refuse_call_scale(model: torch.nn.Module) -> None:
    """Make a diffusers model that a lora_fx backend adapts refuse diffusers' per-call LoRA scale
    (``cross_attention_kwargs={"scale": s}``...): the backend's graphs would ignore it.
    ``compile_pipeline`` applies it instead (and takes it out before the model sees it)."""
    if not type(model).__module__.startswith("diffusers") or getattr(model, "_lora_fx_scale_hook", False):
        return
    names = [n for n in ATTENTION_KWARGS if n in inspect.signature(model.forward).parameters]
    if not names:
        return

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        for name in names:
            given = kwargs.get(name)
            if isinstance(given, dict) and given.get("scale", 1.0) != 1.0:
                raise AdapterConfigError(
                    f"{type(module).__name__}: {name}['scale'] = {given['scale']}: diffusers' per-call LoRA scale "
                    "reaches PEFT's layers, not a lora_fx backend's graphs, so it would be ignored; use "
                    "lora_fx.compile_pipeline(pipe, loras), which applies it as diffusers does, or be.set_scale(s)")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    model._lora_fx_scale_hook = True


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A config dict with sets as sorted lists (what adapter_config.json holds)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in kwargs.items()}
