"""Whether an adapter fits a model: every module, shape, override and target pattern that does not,
listed at once (``Adapter.check`` raises them; ``lora-fx check`` prints them).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from . import targets
from .experts import expert_problems, nesting_problems
from .quantized import out_in

if TYPE_CHECKING:
    from .adapter import Adapter


def model_problems(adapter: Adapter, model: torch.nn.Module) -> list[str]:
    """Every way ``adapter`` does not fit ``model`` (empty when it fits)."""
    problems: list[str] = []
    modules = dict(model.named_modules())
    linear = targets.linear_like_types()
    for fqn, w in adapter.modules.items():
        if w.experts:  # keyed by the parameter's full name (see lora_fx.experts)
            problems += expert_problems(fqn, w.rank, w.experts, modules)
            continue
        mod = modules.get(fqn)
        if mod is None:
            problems.append(f"{fqn}: adapter has LoRA tensors for it, the model has no such module")
            continue
        if w.param is not None:
            p = getattr(mod, w.param, None)
            if not isinstance(p, torch.Tensor) or p.dim() != 2:
                found = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                problems.append(f"{fqn}.{w.param}: expected a 2-D parameter for LoRA on a parameter, found {found} "
                                "(3-D expert parameters are not supported)")
                continue
            want_a, want_b = (w.rank, p.shape[1]), (p.shape[0], w.rank)
        elif isinstance(mod, torch.nn.Embedding):
            want_a, want_b = (w.rank, mod.num_embeddings), (mod.embedding_dim, w.rank)
        elif isinstance(mod, linear):
            out_f, in_f = out_in(mod)
            want_a, want_b = (w.rank, in_f), (out_f, w.rank)
        elif isinstance(mod, targets.CONV_TYPES):
            conv = conv_problems(fqn, mod, w.rank)
            problems += conv
            if conv:
                continue
            ones = (1,) * len(mod.kernel_size)
            want_a = (w.rank, mod.in_channels, *mod.kernel_size)
            want_b = (mod.out_channels, w.rank // mod.groups, *ones)
        else:
            problems.append(f"{fqn}: expected nn.Linear, transformers Conv1D, nn.Conv1d / 2d / 3d or nn.Embedding, "
                            f"found {type(mod).__name__} (not supported)")
            continue
        if w.param is None and w.embedding != isinstance(mod, torch.nn.Embedding):
            problems.append(f"{fqn}: adapter holds {'embedding' if w.embedding else 'linear'} LoRA tensors, "
                            f"the model's module is {type(mod).__name__}")
            continue
        for what, t, want in (("lora_A", w.lora_a, want_a), ("lora_B", w.lora_b, want_b)):
            if tuple(t.shape) != want:
                problems.append(f"{fqn}.{what}: expected shape {want}, found {tuple(t.shape)}")
        if w.magnitude is not None and w.magnitude.numel() != want_b[0]:
            problems.append(f"{fqn}.lora_magnitude_vector: expected {want_b[0]} values (one per output), "
                            f"found shape {tuple(w.magnitude.shape)}")
    problems += nesting_problems({p: w.saved_as for p, w in adapter.modules.items() if w.experts}, modules)
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    for path, t in adapter.overrides.items():
        p = params.get(path)
        if p is None:
            problems.append(f"{path}: adapter replaces this tensor, the model has no such parameter")
        elif p.shape != t.shape:
            problems.append(f"{path}: expected shape {tuple(p.shape)}, found {tuple(t.shape)}")
    try:
        wanted = set(targets.matched_modules(adapter.config, model))
    except Exception as e:  # noqa: BLE001 - reported with the other problems
        problems.append(str(e))
        wanted = set(adapter.modules)
    for fqn in sorted(wanted - set(adapter.modules)):
        problems.append(f"{fqn}: the config targets this module, the adapter has no tensors for it")
    for pat in targets.unmatched_patterns(adapter.config, modules):
        problems.append(f"target_modules entry {pat!r}: matches no module of the model")
    return problems


def conv_problems(fqn: str, mod: torch.nn.Module, rank: int) -> list[str]:
    """What PEFT's conv LoRA cannot express exactly on ``mod`` (lora_A is built with the base's
    kernel, stride and padding only; lora_B with its groups)."""
    p = []
    if mod.padding_mode != "zeros":
        p.append(f"{fqn}: padding_mode={mod.padding_mode!r}: PEFT's lora_A pads with zeros, the base does not; "
                 "expected padding_mode='zeros'")
    if any(d != 1 for d in mod.dilation) and any(k != 1 for k in mod.kernel_size):
        p.append(f"{fqn}: dilation={mod.dilation}: PEFT's lora_A is not dilated, so its output does not match the "
                 "base's shape; expected dilation 1")
    if rank % mod.groups:
        p.append(f"{fqn}: rank {rank} with groups={mod.groups}: expected a rank divisible by groups (as PEFT)")
    return p


def same_base_model(trained_on: str, loaded_from: str) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` and a model's ``name_or_path`` name one
    model, as far as the two strings tell: the same local path however spelled (./m, m/, a
    symlink), or the same model name, which a hub repo id shares with its download (``owner/name``
    against the hub cache's ``models--owner--name/snapshots/<hash>`` or a ``.../name`` directory)."""
    real = [os.path.realpath(os.path.expanduser(s)) for s in (trained_on, loaded_from)]
    return real[0] == real[1] or _model_name(trained_on) == _model_name(loaded_from)


def _model_name(name_or_path: str) -> str:
    """The model's name: a hub repo id's or a directory's last part; a hub cache snapshot's repo name."""
    parts = os.path.normpath(name_or_path).replace(os.sep, "/").split("/")
    cached = [p for p in parts if p.startswith("models--")]
    return (cached[-1].split("--")[-1] if cached else parts[-1]).lower()
