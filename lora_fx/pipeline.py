"""A diffusers pipeline whose components run their LoRAs inside torch.compile: ``compile_pipeline``.

    lora = lora_fx.compile_pipeline(pipe, {"pixel": "loras/pixel", "toy": "loras/toy.safetensors"})
    lora.set_adapters(["pixel", "toy"], [0.7, 0.3])     # diffusers' verbs, no recompile
    image = pipe(prompt, cross_attention_kwargs={"scale": 0.5}).images[0]
    lora.fuse_lora(); ...; lora.unfuse_lora()          # merged in place, then put back bit for bit

Each component a LoRA file holds (unet / transformer, text_encoder, text_encoder_2) gets its own
backend holding every LoRA given (the graphs hold the union of their modules and the sum of their
ranks), so switching, weighting and disabling only write tensors. diffusers' per-call strength is
read where diffusers reads it: the denoiser's ``cross_attention_kwargs`` / ``joint_attention_kwargs`` /
``attention_kwargs`` ``"scale"`` (taken out before the compiled call, so it never becomes a guard) and
``encode_prompt``'s ``lora_scale`` for the text encoders. A lora_fx backend used without this handle
refuses that kwarg (``refuse_call_scale``) instead of ignoring it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .adapter import Adapter, combined_modules
from .backend import LoraBackend
from .diffusers import ATTENTION_KWARGS, PipelineLora, load_diffusers_lora
from .errors import LoraFxError, SwapError
from .reference import merged_state_dict

Weights = float | Sequence[float | Mapping[str, float] | None] | Mapping[str, float] | None


def _rank(adapter: Adapter) -> int:
    return max(w.rank for w in adapter.modules.values())


class LoraPipeline:
    """What ``compile_pipeline`` returns: the pipeline's LoRAs, switched with diffusers' verbs.

    Attributes:
        pipe: the pipeline (its LoRA components replaced by their compiled forms, or compiled in
            place with ``regional=True``); call it as usual, or call this handle.
        loras: name -> ``PipelineLora`` (component -> Adapter).
        backends: component name -> its ``LoraBackend`` (``reports``, ``unseen_modules()``...).
    """

    def __init__(self, pipe: Any, loras: Any, *, mode: str = "branch", regional: bool = False,
                 fullgraph: bool = False, dynamic: bool | None = None, **backend_kwargs: Any):
        if backend_kwargs.get("inplace"):
            raise ValueError("inplace: compile_pipeline merges in place with fuse_lora() (put back by "
                             "unfuse_lora()); build it without inplace=True")
        sources = loras if isinstance(loras, Mapping) and not _is_state_dict(loras) else {"default_0": loras}
        self.pipe = pipe
        self.loras: dict[str, PipelineLora] = {
            name: src if isinstance(src, PipelineLora) else load_diffusers_lora(pipe, src, name=name)
            for name, src in sources.items()}
        self.components = sorted({c for lora in self.loras.values() for c in lora})
        self.active: list[str] = list(self.loras)[-1:]  # diffusers: the LoRA loaded last is the one active
        self.weights: dict[str, dict[str, float]] = {n: {} for n in self.loras}
        self.enabled, self.fused = True, False
        self.backends: dict[str, LoraBackend] = {}
        self.originals = {c: getattr(pipe, c) for c in self.components}
        self._scale = dict.fromkeys(self.components, 1.0)
        self._text_scale = 1.0
        self._saved: dict[str, dict[str, torch.Tensor]] = {}
        self._hooks: list[Any] = []
        for c in self.components:
            adapters = [lora[c] for lora in self.loras.values() if c in lora]
            kw = {"max_rank": sum(_rank(a) for a in adapters), **backend_kwargs}
            be = LoraBackend(self._component_adapters(c) or adapters[:1], mode=mode, reserve=adapters, **kw)
            self.backends[c] = be
            model = self.originals[c]
            if regional:
                model.compile_repeated_blocks(backend=be, fullgraph=fullgraph, dynamic=dynamic)
                runs = model
            else:
                runs = torch.compile(model, backend=be, fullgraph=fullgraph, dynamic=dynamic)
                setattr(pipe, c, runs)
            self._hooks.append(runs.register_forward_pre_hook(self._pre_hook(c), with_kwargs=True, prepend=True))
        self._apply()
        self._wrap_encode_prompt()

    # diffusers' verbs ------------------------------------------------------------------------

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: Weights = None) -> None:
        """Activate ``adapter_names`` with ``adapter_weights`` (one float for all, one per name, or
        per name a dict component -> float: ``{"unet": 0.7, "text_encoder": 0.3}``), as diffusers'
        ``pipe.set_adapters``; the others are off. No recompile."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, Sequence) else [adapter_weights] * len(names)
        self._refuse_while_fused("set_adapters")
        problems = [f"{n!r}: expected one of the pipeline's LoRAs {list(self.loras)}" for n in names
                    if n not in self.loras]
        if len(weights) != len(names):
            problems.append(f"adapter_weights: expected {len(names)} weights (one per name), found {len(weights)}")
        for n, w in zip(names, weights, strict=False):
            for c, x in (w.items() if isinstance(w, Mapping) else ()):
                if c not in self.components or not isinstance(x, int | float):
                    problems.append(f"{n!r}: weight for {c!r}: expected a float for one of {self.components} "
                                    f"(per-block weights are not supported), found {x!r}")
        if problems:
            raise SwapError("set_adapters:\n  " + "\n  ".join(problems))
        self.active = names
        self.weights = {n: (dict(w) if isinstance(w, Mapping) else dict.fromkeys(self.components, 1.0 if w is None
                        else float(w))) for n, w in zip(names, weights, strict=True)}
        self._apply()

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate ``adapter_name`` (or several, each at weight 1)."""
        self.set_adapters(adapter_name)

    def get_active_adapters(self) -> list[str]:
        return list(self.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """component -> the LoRAs that hold it, as diffusers' ``get_list_adapters``."""
        return {c: [n for n, lora in self.loras.items() if c in lora] for c in self.components}

    def disable_lora(self) -> None:
        """Run the base pipeline (the LoRAs kept) until ``enable_lora``."""
        self._refuse_while_fused("disable_lora")
        self.enabled = False
        self._apply()

    def enable_lora(self) -> None:
        self._refuse_while_fused("enable_lora")
        self.enabled = True
        self._apply()

    def fuse_lora(self, components: Sequence[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: Sequence[str] | None = None) -> None:
        """Merge the active LoRAs (with their weights, times ``lora_scale``) into ``components``'
        weights in place, as diffusers' ``fuse_lora``; the compiled graphs then run the base op on
        the merged weights (no recompile). ``unfuse_lora`` puts the weights back bit for bit.

        Raises:
            LoraFxError: already fused, or (``safe_fusing``) a merged weight with NaN / inf.
        """
        self._refuse_while_fused("fuse_lora")
        names = list(adapter_names) if adapter_names is not None else self.active
        components = list(components) if components is not None else self.components
        unknown = [c for c in components if c not in self.components]
        if unknown:
            raise LoraFxError(f"fuse_lora: components {unknown}: expected some of {self.components}")
        merged: dict[str, dict[str, torch.Tensor]] = {}
        for c in components:
            adapters = [a.scaled(lora_scale) for a in self._component_adapters(c, names)]
            if not adapters:
                continue
            model = self.originals[c]
            keys = _merged_keys(adapters)
            full = merged_state_dict(model, adapters)
            merged[c] = {k: full[k] for k in keys}
            bad = [k for k, v in merged[c].items() if not bool(torch.isfinite(v).all())] if safe_fusing else []
            if bad:
                raise LoraFxError(f"fuse_lora: {c}: merged weights {bad} hold NaN / inf; nothing was fused")
        for c, tensors in merged.items():
            params = dict(self.originals[c].state_dict(keep_vars=True))
            self._saved[c] = {k: params[k].detach().clone() for k in tensors}
            with torch.no_grad():
                for k, v in tensors.items():
                    params[k].copy_(v)
        self.fused = True
        self._apply()

    def unfuse_lora(self, components: Sequence[str] | None = None) -> None:
        """Put the weights ``fuse_lora`` merged into back exactly (the copies it saved)."""
        for c in list(components) if components is not None else list(self._saved):
            params = dict(self.originals[c].state_dict(keep_vars=True))
            with torch.no_grad():
                for k, v in self._saved.pop(c, {}).items():
                    params[k].copy_(v)
        self.fused = bool(self._saved)
        self._apply()

    def unload_lora_weights(self) -> None:
        """Put the uncompiled components back in the pipeline (unfused first), without their LoRAs."""
        self.unfuse_lora()
        for h in self._hooks:
            h.remove()
        for c, model in self.originals.items():
            setattr(self.pipe, c, model)
            self.backends[c].disable()
        if "encode_prompt" in self.pipe.__dict__:
            del self.pipe.encode_prompt

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.pipe(*args, **kwargs)

    # inside ------------------------------------------------------------------------------------

    def _component_adapters(self, c: str, names: Sequence[str] | None = None) -> list[Adapter]:
        names = self.active if names is None else names
        return [self.loras[n][c].scaled(self.weights.get(n, {}).get(c, 1.0)) for n in names if c in self.loras[n]]

    def _apply(self) -> None:
        """Bring every backend to the handle's state: the active LoRAs with their weights, off while
        disabled or fused (fused weights already hold them)."""
        for c, be in self.backends.items():
            adapters = self._component_adapters(c)
            if adapters:
                be.swap(adapters)
            on = self.enabled and bool(adapters) and c not in self._saved
            be.enable() if on else be.disable()

    def _refuse_while_fused(self, verb: str) -> None:
        if self.fused:
            raise LoraFxError(f"{verb}: the LoRAs are fused into {sorted(self._saved)}'s weights; call unfuse_lora() "
                              "first")

    def _set_scale(self, c: str, scale: float) -> None:
        if scale != 1.0 and c in self._saved:
            raise LoraFxError(f"{c}: a per-call LoRA scale ({scale}) cannot change fused weights; call unfuse_lora() "
                              "first, or fuse with fuse_lora(lora_scale=...)")
        if scale != self._scale[c]:
            self.backends[c].set_scale(scale)
            self._scale[c] = scale

    def _pre_hook(self, c: str):
        text = c.startswith("text_encoder")

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            scale = self._text_scale if text else 1.0
            for name in ATTENTION_KWARGS:
                given = kwargs.get(name)
                if isinstance(given, Mapping) and "scale" in given:
                    given = dict(given)
                    scale = float(given.pop("scale"))
                    kwargs[name] = given or None  # as diffusers' apply_lora_scale: the model never sees it
                    # (an emptied dict is passed as None: the graph compiled for None serves it)
            self._set_scale(c, scale)
            return args, kwargs

        return hook

    def _wrap_encode_prompt(self) -> None:
        """diffusers scales the text encoders' LoRA by ``encode_prompt``'s ``lora_scale``."""
        encode = getattr(self.pipe, "encode_prompt", None)
        if encode is None or "lora_scale" not in inspect.signature(encode).parameters:
            return
        signature = inspect.signature(encode)

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            scale = signature.bind(*args, **kwargs).arguments.get("lora_scale")
            self._text_scale = 1.0 if scale is None else float(scale)
            try:
                return encode(*args, **kwargs)
            finally:
                self._text_scale = 1.0

        self.pipe.encode_prompt = encode_prompt


def _is_state_dict(obj: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def _merged_keys(adapters: Sequence[Adapter]) -> set[str]:
    """The state dict keys a merge changes: each targeted weight (or parameter), its bias with
    lora_bias, and the tensors the adapters replace."""
    keys = {k for a in adapters for k in a.overrides}
    for fqn, ws in combined_modules(adapters).items():
        keys.add(f"{fqn}.{ws[0].param or 'weight'}")
        if any(w.bias is not None for w in ws):
            keys.add(f"{fqn}.bias")
    return keys


def compile_pipeline(pipe: Any, loras: Any, *, mode: str = "branch", regional: bool = False, fullgraph: bool = False,
                     dynamic: bool | None = None, **backend_kwargs: Any) -> LoraPipeline:
    """Compile each LoRA component of a diffusers pipeline with a lora_fx backend holding ``loras``.

    Args:
        pipe: a diffusers pipeline (Stable Diffusion, SDXL, SD3, Flux, ...) with no LoRA loaded by
            diffusers (``pipe.unload_lora_weights()`` first).
        loras: name -> what ``pipe.load_lora_weights`` takes (a directory, file or state dict) or
            a ``PipelineLora``; or one such source (named "default_0", as diffusers names it).
        mode: "branch" (switch, weight, disable: no recompile) or "fold".
        regional: compile each component's repeated blocks in place
            (``compile_repeated_blocks``) instead of the whole component.
        fullgraph, dynamic: as ``torch.compile``.
        backend_kwargs: as :func:`lora_fx.backend` (``inner=``, ``max_rank=``, ...).

    Returns:
        A ``LoraPipeline``; the last LoRA given is active at weight 1, as after diffusers'
        ``load_lora_weights``.
    """
    return LoraPipeline(pipe, loras, mode=mode, regional=regional, fullgraph=fullgraph, dynamic=dynamic,
                        **backend_kwargs)
