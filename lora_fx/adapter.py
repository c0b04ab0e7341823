"""Adapter: one LoRA adapter in memory, one ``LoraWeights`` per targeted module.

The LoRA update of a module with weight W (out, in), for input x (..., in):

    y = W x + b + scale * (B (A x) + b_B)                      (LoRA, lora_bias optional)
    y = (m / ||W + scale * B A||_row) * (W x + scale * B A x) + b      (DoRA)

with A = ``lora_a`` (r, in), B = ``lora_b`` (out, r), scale = alpha / r (alpha / sqrt(r) with
rsLoRA) times the load-time multiplier (Hu et al. 2021, arXiv:2106.09685; Liu et al. 2024,
arXiv:2402.09353). Embeddings store A as (r, vocab) and B as (dim, r), as PEFT does.

Convolutions (nn.Conv1d / 2d / 3d, weight (out, in / groups, *k)) keep PEFT's layout: A is a conv
kernel (r, in, *k) run with the base's stride and padding, B a 1x1 conv (out, r / groups, *1) with
the base's groups; its matrix form is block-diagonal (out, r), and B A in matrix form is
(out, in * prod(k)), the weight's rows.

Whether an adapter fits a model (``model_problems``, ``conv_problems``) lives in :mod:`.checks`;
those names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .checks import conv_problems as conv_problems  # re-exported (its home before checks.py)
from .checks import model_problems, same_base_model
from .config import LoraConfig
from .errors import ModelMismatchError, raise_if
from .experts import expert_delta

PREFIX = "base_model.model."


@dataclass
class LoraWeights:
    """The tensors of one module's LoRA update.

    Attributes:
        lora_a: (r, in) for Linear / Conv1D, (r, vocab) for Embedding, (r, in, *k) for ConvNd.
        lora_b: (out, r) for Linear / Conv1D, (dim, r) for Embedding, (out, r / groups, *1) for ConvNd.
        scale: alpha / r (or alpha / sqrt(r)), times the adapter's load-time multiplier.
        magnitude: DoRA's m, (out,) ((1, out, *1) for ConvNd, as PEFT stores it), or None.
        bias: lora_B's bias (lora_bias=True), (out,), or None. Scaled by ``scale`` like B A x.
        embedding: whether the module is an nn.Embedding.
        param: a parameter of the module that becomes W + scale * B A wherever the model reads it
            (PEFT's ``target_parameters`` and nn.MultiheadAttention's in_proj_weight / out_proj),
            instead of an update added at the module's output; None for module LoRA.
        saved_as: the module path of PEFT's keys when it differs from the module's own
            (``mha.base_layer.out_proj`` for ``mha.out_proj``; ``experts.base_layer`` for a nested
            expert parameter).
        experts: E for LoRA on a 3-D expert parameter (E, out, in), 0 otherwise. Its tensors keep
            PEFT's layout, lora_a (r * E, in) and lora_b (out, r * E) (see :mod:`lora_fx.experts`);
            the key in ``Adapter.modules`` is then the parameter's full name.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    embedding: bool = False
    param: str | None = None
    saved_as: str | None = None
    experts: int = 0

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0] // (self.experts or 1)

    @property
    def kernel(self) -> tuple[int, ...]:
        """A conv's kernel size (() for Linear / Conv1D / Embedding)."""
        return tuple(self.lora_a.shape[2:])

    @property
    def groups(self) -> int:
        """A conv's groups (lora_B is grouped as the base conv is); 1 otherwise."""
        return self.rank // self.lora_b.shape[1] if self.lora_b.shape[1] and not self.experts else 1

    def b_matrix(self) -> torch.Tensor:
        """B as an (out, r) matrix: a grouped conv's B becomes block-diagonal."""
        return ungrouped(self.lora_b, self.groups).flatten(1)

    def a_matrix(self) -> torch.Tensor:
        """A as an (r, in * prod(k)) matrix."""
        return self.lora_a.flatten(1)

    def to(self, device: torch.device | str | None) -> LoraWeights:
        """The same weights on ``device`` (self when they are there already, or device is None)."""
        if device is None or self.lora_a.device == torch.device(device):
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, lora_a=move(self.lora_a), lora_b=move(self.lora_b),
                                   magnitude=move(self.magnitude), bias=move(self.bias))

    def scaled(self, multiplier: float) -> LoraWeights:
        """The same tensors with ``scale`` times ``multiplier``."""
        return self if multiplier == 1.0 else dataclasses.replace(self, scale=self.scale * multiplier)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale * B @ A as an (out, in * prod(k)) matrix (embeddings: (dim, vocab)); for expert
        parameters, scale * B_e @ A_e for every expert, (E, out, in)."""
        if self.experts:
            return expert_delta(self.lora_a, self.lora_b, self.experts, self.scale, dtype)
        return self.scale * (self.b_matrix().to(dtype) @ self.a_matrix().to(dtype))


def ungrouped(kernel: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv kernel (out, in / groups, *k) as the equal dense kernel (out, in, *k),
    block-diagonal over the groups (lora_B: (out, r / groups, *1) -> (out, r, *1)); ``kernel``
    itself when groups is 1."""
    if groups == 1:
        return kernel
    out_f, per = kernel.shape[0], kernel.shape[1]
    dense = kernel.new_zeros(out_f, per * groups, *kernel.shape[2:])
    rows = out_f // groups
    for j in range(groups):
        dense[j * rows:(j + 1) * rows, j * per:(j + 1) * per] = kernel[j * rows:(j + 1) * rows]
    return dense


def regrouped(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`ungrouped`: the diagonal blocks of a dense (out, r, *k) kernel."""
    if groups == 1:
        return dense
    out_f, r = dense.shape[0], dense.shape[1]
    rows, per = out_f // groups, r // groups
    return torch.cat([dense[j * rows:(j + 1) * rows, j * per:(j + 1) * per] for j in range(groups)])


HALF = (torch.float16, torch.bfloat16)


def adapter_dtype(dtype: torch.dtype | None, found: torch.dtype, autocast: bool = True) -> torch.dtype:
    """The dtype LoRA tensors are held and computed in: ``dtype`` when given, else fp32 for half
    precision (PEFT's ``autocast_adapter_dtype=True``, its default: a bf16 / fp16 adapter file,
    or a bf16 / fp16 model's new adapter, computes in fp32), else ``found``."""
    return dtype if dtype is not None else torch.float32 if autocast and found in HALF else found


@dataclass
class Adapter:
    """A loaded (or freshly initialised) LoRA adapter.

    Attributes:
        config: the adapter's LoraConfig.
        modules: module fqn (relative to the base model, as PEFT's keys) -> LoraWeights.
        overrides: parameter path -> full tensor that replaces the model's (modules_to_save,
            biases saved with bias="all"/"lora_only", embedding layers saved with the adapter).
        multiplier: the load-time scale (ExLlamaV2's lora_scaling), already inside each ``scale``.
        name: a label for reports and mixed batches.
    """

    config: LoraConfig
    modules: dict[str, LoraWeights]
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    multiplier: float = 1.0
    name: str | None = None

    @property
    def is_dora(self) -> bool:
        return any(w.magnitude is not None for w in self.modules.values())

    def scaled(self, multiplier: float) -> Adapter:
        """The same adapter with its load-time multiplier times ``multiplier`` (tensors shared)."""
        mods = {k: w.scaled(multiplier) for k, w in self.modules.items()}
        return dataclasses.replace(self, modules=mods, multiplier=self.multiplier * multiplier)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's on-disk keys. The load-time multiplier is folded into lora_B so PEFT reproduces it."""
        out: dict[str, torch.Tensor] = {}
        for fqn, w in self.modules.items():
            key = PREFIX + (w.saved_as or fqn)
            b = w.lora_b * self.multiplier if self.multiplier != 1.0 else w.lora_b
            if w.embedding:
                out[f"{key}.lora_embedding_A"], out[f"{key}.lora_embedding_B"] = w.lora_a, b
                continue
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = w.lora_a, b
            if w.bias is not None:
                out[f"{key}.lora_B.bias"] = w.bias * self.multiplier
            if w.magnitude is not None:
                out[f"{key}.lora_magnitude_vector"] = w.magnitude
        for path, t in self.overrides.items():
            module, _, param = path.rpartition(".")
            key = f"{module}.base_layer.{param}" if module in self.modules else path
            out[PREFIX + key] = t
        return {k: v.detach().contiguous() for k, v in out.items()}

    def save(self, directory: str | os.PathLike) -> None:
        """Write adapter_config.json and adapter_model.safetensors in PEFT's format.

        ``peft.PeftModel.from_pretrained(model, directory)`` loads the result and gives the same
        outputs as this adapter.
        """
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(self.config.to_dict(), f, indent=2, sort_keys=True)
        save_file(self.state_dict(), os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})

    def check(self, model: torch.nn.Module) -> None:
        """Check that this adapter fits ``model``; list every problem in one error.

        Raises:
            ModelMismatchError: modules the model lacks, unsupported module types, shape
                mismatches, override tensors without a parameter, config patterns that match no module.
        Warns:
            UserWarning: base_model_name_or_path names another model than the model's
                name_or_path (a local path and a hub id of the same name are one model).
        """
        problems = model_problems(self, model)
        raise_if(problems, ModelMismatchError, f"adapter {self.name or ''} does not fit the model:".replace("  ", " "))
        want = self.config.base_model_name_or_path
        have = getattr(getattr(model, "config", None), "name_or_path", None) or getattr(model, "name_or_path", None)
        if want and have and not same_base_model(want, have):
            warnings.warn(f"adapter was trained on {want!r}, the model is {have!r}", UserWarning, stacklevel=2)

def as_adapters(adapters: Adapter | Sequence[Adapter]) -> list[Adapter]:
    """A list of adapters whose updates are summed (llama.cpp's repeated --lora-scaled)."""
    out = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    if not out or not all(isinstance(a, Adapter) for a in out):
        raise TypeError(f"expected an Adapter or a non-empty list of them, found {adapters!r}")
    return out


def combined_modules(adapters: Sequence[Adapter]) -> dict[str, list[LoraWeights]]:
    """fqn -> the LoraWeights of every adapter that targets it, in adapter order.

    Raises:
        ModelMismatchError: DoRA adapters summed with others (DoRA's norm is not additive), or
            two adapters replacing the same parameter.
    """
    problems: list[str] = []
    if len(adapters) > 1 and any(a.is_dora for a in adapters):
        problems.append("DoRA adapters: expected one adapter alone, found DoRA summed with others; "
                        "merge them first or apply one at a time")
    out: dict[str, list[LoraWeights]] = {}
    for a in adapters:
        for fqn, w in a.modules.items():
            out.setdefault(fqn, []).append(w)
    seen: dict[str, int] = {}
    for i, a in enumerate(adapters):
        for path in a.overrides:
            if path in seen:
                problems.append(f"{path}: replaced by adapters {seen[path]} and {i}; expected at most one")
            seen[path] = i
    raise_if(problems, ModelMismatchError, "adapters cannot be combined:")
    return out


def combined_overrides(adapters: Sequence[Adapter]) -> dict[str, torch.Tensor]:
    """Parameter path -> replacement tensor over all adapters (checked by ``combined_modules``)."""
    return {p: t for a in adapters for p, t in a.overrides.items()}
