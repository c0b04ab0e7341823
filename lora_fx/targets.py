"""PEFT's target-matching rules as pure functions over module fqns.

Each function reproduces one rule of ``peft.tuners.tuners_utils.check_target_module_exists`` or
``peft.utils.other.get_pattern_key``; tests compare them with PEFT on generated names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch

from .config import DEFAULT_TARGET_MODULES, LoraConfig
from .errors import AdapterConfigError

ALL_LINEAR = "all-linear"
CONV_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _matches_list(patterns: Iterable[str], fqn: str) -> bool:
    return any(fqn == p or fqn.endswith("." + p) for p in patterns)


def is_excluded(config: LoraConfig, fqn: str) -> bool:
    """exclude_modules (str: fullmatch, list: exact-or-suffix) and modules_to_save exclude a module."""
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, fqn):
                return True
        elif _matches_list(ex, fqn):
            return True
    return any(_names(m, fqn) for m in config.modules_to_save or ())


def _names(entry: str, fqn: str) -> bool:
    """Whether a modules_to_save entry names module ``fqn`` or a module above it (a dotted part)."""
    return re.match(rf"(^|.*\.){entry}($|\..*)", fqn) is not None


def is_module_copy(config: LoraConfig, path: str) -> bool:
    """Whether the tensor at ``path`` belongs to a modules_to_save copy: PEFT wraps every module
    whose name ends with an entry (plain suffix: "norm" takes input_layernorm too) and saves a
    wrapped module's submodules under it."""
    module = path.rpartition(".")[0]
    return any(module.endswith(m) or _names(m, module) for m in config.modules_to_save or ())


def layer_index(fqn: str, layers_pattern: str | list[str] | None) -> int | None:
    """The first numbered segment of ``fqn`` (after ``layers_pattern`` when one is given)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", fqn)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", fqn)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def is_target(config: LoraConfig, fqn: str, target_modules: str | list[str] | None = None) -> bool:
    """Whether PEFT puts a LoRA layer on the module named ``fqn``.

    Args:
        config: the adapter's config.
        fqn: module path relative to the base model (``model.layers.0.self_attn.q_proj``).
        target_modules: overrides ``config.target_modules``, e.g. once "all-linear" or None was
            resolved against a model by :func:`resolve_target_modules`.
    """
    targets = config.target_modules if target_modules is None else target_modules
    if is_excluded(config, fqn) or targets is None:
        return False
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            raise AdapterConfigError(f"{fqn}: 'all-linear' needs a model; call resolve_target_modules first")
        return re.fullmatch(targets, fqn) is not None
    if fqn in targets:
        return True
    if not _matches_list(targets, fqn):
        return False
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    idx = layer_index(fqn, config.layers_pattern)
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def pattern_key(patterns: Iterable[str], fqn: str) -> str:
    """The first key in ``patterns`` (dict order) that matches the end of ``fqn``, else ``fqn``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", fqn):
            return key
    return fqn


def rank_of(config: LoraConfig, fqn: str) -> int:
    """The configured rank of module ``fqn`` (rank_pattern first, then r)."""
    return config.rank_pattern.get(pattern_key(config.rank_pattern, fqn), config.r)


def alpha_of(config: LoraConfig, fqn: str) -> float:
    """The configured alpha of module ``fqn`` (alpha_pattern first, then lora_alpha)."""
    return config.alpha_pattern.get(pattern_key(config.alpha_pattern, fqn), config.lora_alpha)


def scale_of(config: LoraConfig, fqn: str, multiplier: float = 1.0) -> float:
    """alpha / r (or alpha / sqrt(r) with use_rslora), times the load-time multiplier."""
    r, alpha = rank_of(config, fqn), alpha_of(config, fqn)
    return multiplier * (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


def linear_like_types() -> tuple[type, ...]:
    """Module types PEFT counts as linear: nn.Linear and transformers' Conv1D (when installed)."""
    types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return types
    return (*types, Conv1D)


def module_kind(mod: torch.nn.Module) -> str | None:
    """How lora_fx applies LoRA to ``mod``: "embedding", "linear" (nn.Linear and linear-like
    quantized modules), "conv1d" (transformers' Conv1D, weight (in, out)), "conv" (nn.Conv1d /
    2d / 3d), or None (not supported)."""
    if isinstance(mod, torch.nn.Embedding):
        return "embedding"
    if isinstance(mod, CONV_TYPES):
        return "conv"
    linear = linear_like_types()
    if isinstance(mod, linear):
        return "linear" if isinstance(mod, torch.nn.Linear) else "conv1d"
    return None


def resolve_target_modules(config: LoraConfig, model: torch.nn.Module) -> str | list[str]:
    """Turn "all-linear" and None into the concrete target list PEFT would use on ``model``.

    Raises:
        AdapterConfigError: target_modules is None and the model's architecture has no default.
    """
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = None
        get_head = getattr(model, "get_output_embeddings", None)
        if callable(get_head):
            head = get_head()
        kinds = linear_like_types()
        return sorted(n for n, m in model.named_modules() if isinstance(m, kinds) and m is not head and n)
    if targets is None and config.target_parameters:
        return []  # LoRA on parameters only
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise AdapterConfigError(
                f"target_modules: expected a list or pattern, found null, and model type {model_type!r} "
                f"has no default (known: {sorted(DEFAULT_TARGET_MODULES)})"
            )
        return list(DEFAULT_TARGET_MODULES[model_type])
    return targets


def matched_modules(config: LoraConfig, model: torch.nn.Module) -> list[str]:
    """Every module of ``model`` that ``config`` targets, in model order."""
    targets = resolve_target_modules(config, model)
    return [n for n, _ in model.named_modules() if n and is_target(config, n, targets)]


def unmatched_patterns(config: LoraConfig, names: Iterable[str]) -> list[str]:
    """Entries of a list-valued target_modules that match none of ``names`` (a likely typo)."""
    targets = config.target_modules
    names = list(names)
    if targets is None or targets == ALL_LINEAR:
        return []
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    return [t for t in targets if not any(_matches_list([t], n) for n in names)]
