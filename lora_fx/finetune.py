"""Fine-tuning a model in place: ``model = lora_fx.for_training(model, adapter_or_config)``.

The model stays the object it was (a transformers ``PreTrainedModel`` stays one, so
``transformers.Trainer`` treats it as its own): its parameters are frozen, what PEFT trains of the
adapter becomes parameters of its modules (``lora_fx_A`` / ``lora_fx_B``, lora_B's bias
``lora_fx_B_bias``, DoRA's ``lora_fx_magnitude``, a modules_to_save copy
``lora_fx_saved_<param>``: what an optimizer over the trainable parameters
gets), its forward is compiled with a branch-mode backend (``model.compile``,
kept as ``model.lora_fx_backend``) and ``model.save_pretrained(dir)`` writes the trained adapter
in PEFT's format.

``save_pretrained`` is bound on the instance, not on a new class: ``type(model)``, ``isinstance``,
pickling by class and ``type(model).save_pretrained(model, dir)`` (the whole model) stay as they
were for other code; only this object's ``save_pretrained`` writes the adapter.
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any

import torch

from . import targets
from .adapter import Adapter
from .backend import LoraBackend
from .config import LoraConfig
from .distributed import _full, is_attached_name
from .errors import AdapterConfigError, raise_if
from .loading import init_adapter
from .quantized import module_format

CHECKPOINT_FILE = "model.safetensors"  # the name Trainer's resume_from_checkpoint loads a model's state dict from


def for_training(model: torch.nn.Module, adapter_or_config: Adapter | LoraConfig | Any,
                 **backend_kwargs: Any) -> torch.nn.Module:
    """Make ``model`` train a LoRA adapter as ``peft.get_peft_model`` would, compiled by lora_fx.

    Every parameter the model has is frozen; the adapter's A and B are registered on their modules
    (``lora_fx_A`` / ``lora_fx_B``, with lora_bias ``lora_fx_B_bias``, with DoRA
    ``lora_fx_magnitude``, modules_to_save copies ``lora_fx_saved_<param>``: what PEFT trains)
    with gradients on, so ``model.named_parameters()`` and ``state_dict()`` hold them and an
    optimizer over the trainable parameters trains exactly them;
    the forward is compiled with ``lora_fx.backend(adapter, mode="branch", **backend_kwargs)``
    (``model.compile``: calls to ``model(...)`` run the compiled forward). The backend is
    ``model.lora_fx_backend``; ``model.save_pretrained(dir, **kwargs)`` writes the trained adapter.
    A quantized base is prepared as PEFT trains it (:func:`prepare_quantized_base`).

    Args:
        model: the base model (a ``transformers.PreTrainedModel`` to hand to ``Trainer``).
        adapter_or_config: a lora_fx ``Adapter`` (its A and B are the starting values), or a
            lora_fx / ``peft.LoraConfig``, initialised as PEFT initialises it (``init_adapter``).
        backend_kwargs: passed to ``lora_fx.backend`` (``inner=``, ``options=``, ...); ``mode``
            may only be "branch".

    Returns:
        ``model`` itself.

    Raises:
        AdapterConfigError: what PEFT would train and lora_fx does not train yet (base biases, a
            modules_to_save copy of a LoRA-targeted module, an Adapter without the copies its
            config names), a PEFT initialisation other than the
            default, a mode other than branch, a model prepared already; every problem at once.
        GraphRewriteError / ModelMismatchError: the adapter does not fit the model (``be.attach``).
    """
    adapter = _adapter_for(model, adapter_or_config)
    problems = untrained_problems(adapter)
    mode = backend_kwargs.setdefault("mode", "branch")
    if mode != "branch":
        problems.append(f"mode: expected 'branch' (A and B are trained as parameters), found {mode!r}")
    if "lora_fx_backend" in vars(model):
        problems.append(f"{type(model).__name__}: expected a model for_training has not prepared, found one it has "
                        "(model.lora_fx_backend); swap adapters with model.lora_fx_backend.swap(adapter)")
    raise_if(problems, AdapterConfigError, "for_training: cannot train this adapter as PEFT would:")
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    if adapter.config.base_model_name_or_path is None and name:  # as get_peft_model records it
        adapter = dataclasses.replace(adapter, config=dataclasses.replace(adapter.config,
                                                                          base_model_name_or_path=name))
    be = LoraBackend(adapter, **backend_kwargs)
    base = list(model.parameters())
    be.attach(model)  # checks the model first: a refused model is left as it was
    for p in base:
        p.requires_grad_(False)
    be.parameters(as_peft=True)  # A, B, lora_B's bias, DoRA's magnitude, modules_to_save copies: gradients on
    prepare_quantized_base(model)
    model.lora_fx_backend = be
    model.save_pretrained = types.MethodType(save_adapter, model)
    model.compile(backend=be)
    return model


def prepare_quantized_base(model: torch.nn.Module) -> None:
    """A quantized base (bitsandbytes 4-bit / 8-bit, torchao) trains as ``get_peft_model`` trains it.

    Its input embeddings' output requires grad (``enable_input_require_grads``, as PEFT's
    ``prepare_model_for_kbit_training`` does): a graph traced over a frozen model holds each
    quantized kernel's inference path, which has no backward, and the gradients of the A / B
    before it would be lost (the compiled call refuses to train through it). A transformers model
    is marked as carrying trainable adapters (``_hf_peft_config_loaded``, what transformers sets
    when it loads an adapter): ``Trainer`` refuses a quantized model without one. A dense model
    is left as it is."""
    if not any(module_format(m) for m in model.modules()):
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if getattr(model, "is_quantized", False):
        model._hf_peft_config_loaded = True


def untrained_problems(adapter: Adapter) -> list[str]:
    """What ``peft.get_peft_model`` would train for ``adapter``'s config that lora_fx's branch
    mode does not train yet (training without them would silently train less than PEFT)."""
    c, p = adapter.config, []
    copies = {path for path in adapter.overrides if targets.is_module_copy(c, path)}
    p += [f"modules_to_save: {path} is the copy of a module LoRA also targets; PEFT trains one or the other, "
          "expected the module in target_modules or in modules_to_save" for path in sorted(copies)
          if path.rpartition(".")[0] in adapter.modules]
    if c.modules_to_save and not copies:
        p.append(f"modules_to_save: {c.modules_to_save} has no copy in the adapter (adapter.overrides); expected the "
                 "copies PEFT trains: pass the config, or lora_fx.from_peft(peft_model)")
    if c.bias != "none":
        p.append(f"bias: {c.bias!r} trains the base biases, which are not trained yet; use bias='none'")
    if set(adapter.overrides) - copies and c.bias == "none":
        p.append(f"overrides: the adapter replaces {sorted(adapter.overrides)}, which are not trained yet")
    return p


def _adapter_for(model: torch.nn.Module, source: Any) -> Adapter:
    """The adapter to train: ``source`` itself, or a config initialised as PEFT would."""
    if isinstance(source, Adapter):
        return source
    if isinstance(source, LoraConfig):
        return _with_copies(model, init_adapter(model, source))
    if type(source).__module__.startswith("peft") and hasattr(source, "to_dict"):
        data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in source.to_dict().items()}
        init = data.get("init_lora_weights", True)
        if init is not True:
            raise AdapterConfigError(
                f"init_lora_weights: expected True (PEFT's default, which init_adapter reproduces), found {init!r}; "
                "initialise with peft.get_peft_model and pass lora_fx.from_peft(peft_model)[1]['default'] instead")
        return _with_copies(model, init_adapter(model, LoraConfig.from_dict(data, source="peft.LoraConfig")))
    raise TypeError(f"adapter_or_config: expected a lora_fx Adapter, a lora_fx LoraConfig or a peft.LoraConfig, "
                    f"found {type(source).__name__}")


def _with_copies(model: torch.nn.Module, adapter: Adapter) -> Adapter:
    """``adapter`` with PEFT's fresh modules_to_save copies: each parameter of a module the config
    names, as the model holds it (ModulesToSaveWrapper deep-copies the module)."""
    copies = {path: p.detach().clone() for path, p in model.named_parameters(remove_duplicate=False)
              if targets.is_module_copy(adapter.config, path) and path not in adapter.overrides}
    return dataclasses.replace(adapter, overrides={**adapter.overrides, **copies}) if copies else adapter


def save_adapter(model: torch.nn.Module, save_directory: str | os.PathLike, *, is_main_process: bool = True,
                 **kwargs: Any) -> None:
    """``model.save_pretrained`` after ``for_training``: the trained adapter in PEFT's format.

    Writes adapter_config.json and adapter_model.safetensors (``PeftModel.from_pretrained(base,
    dir)`` loads them), and model.safetensors holding only A and B under the model's own parameter
    names: what ``Trainer(resume_from_checkpoint=...)`` loads into a model that is not a
    ``PeftModel`` (``load_state_dict(..., strict=False)``). The values are always the backend's
    parameters; the other keywords transformers passes (``state_dict``, ``safe_serialization``,
    ``max_shard_size``, ...) are accepted and change nothing (an adapter is one small file).
    On resume, Trainer logs the frozen base weights as missing from that file: they are the
    model's own, never trained, and stay as they are.
    """
    from safetensors.torch import save_file

    be: LoraBackend = model.lora_fx_backend
    adapter = be.trained_adapter()  # gathers sharded A / B: every rank calls it
    if not is_main_process:
        return
    adapter.save(save_directory)
    ab = {name: _full(p).detach().cpu().contiguous() for name, p in model.named_parameters()
          if is_attached_name(name)}
    save_file(ab, os.path.join(save_directory, CHECKPOINT_FILE), metadata={"format": "pt"})
