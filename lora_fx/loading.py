"""load_adapter: a PEFT adapter directory (or a locally cached hub repo) -> Adapter, validated.

init_adapter / random_adapter (a fresh adapter on a model) live in :mod:`.init`, adapter_dtype in
:mod:`.adapter`; they are re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import torch

from . import targets
from .adapter import HALF as HALF
from .adapter import PREFIX, Adapter, LoraWeights, adapter_dtype
from .config import TRAINING_STATE_KEYS, LoraConfig
from .errors import AdapterConfigError, AdapterWeightsError, LoraFxError, raise_if
from .experts import expert_keys, unnested
from .init import init_adapter as init_adapter
from .init import random_adapter as random_adapter

SAFETENSORS, BIN = "adapter_model.safetensors", "adapter_model.bin"
# suffix -> role of the tensor in LoraWeights
_ROLES = {
    ".lora_A.weight": "lora_a",
    ".lora_B.weight": "lora_b",
    ".lora_B.bias": "bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_embedding_A": "emb_a",
    ".lora_embedding_B": "emb_b",
}
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name


def resolve_path(path: str | os.PathLike, *, what: str = "PEFT adapter",
                 error: type[LoraFxError] = AdapterConfigError, hub: bool = True) -> str:
    """A local directory, or (``hub``) a Hugging Face repo id found in the local cache (no network).

    ``owner/name`` is both a relative path and a repo id: a local directory wins, then the hub
    cache; when neither has it, the error says both places were looked in if ``owner`` is a local
    directory (a path typo, most likely), else how to download the repo. A path spelled as one
    (./x, ../x, /x, ~/x, more than one separator) is never taken for a repo id.

    Raises:
        ``error``: naming the path, what was looked for and where.
    """
    given = os.fspath(path)
    local = os.path.expanduser(given)
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise error(f"{given}: expected a {what} directory, found a file")
    if hub and is_hub_id(given):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(given, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means: not in the local cache
            if os.path.isdir(given.split("/")[0]):
                raise error(f"no such directory: {given} (expected a {what} directory; not found locally at "
                            f"{os.path.abspath(given)}, nor in the hub cache as repo id {given}); check the path"
                            ) from None
            raise error(
                f"{given}: expected a local {what} directory or a hub repo id in the local cache, found "
                f"neither ({type(e).__name__}); download it on a connected machine with "
                f"`huggingface-cli download {given}` (cache: $HF_HOME) or pass the directory"
            ) from None
    raise error(f"no such directory: {given} (expected a {what} directory"
                + (", or a hub repo id of the form owner/name in the local cache)" if hub else ")"))


def is_hub_id(path: str) -> bool:
    """``owner/name`` as the hub spells repo ids, not a path spelled as one (./x, ../x)."""
    return bool(HUB_ID.fullmatch(path)) and not path.startswith(".")


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors (memory-mapped) or adapter_model.bin (weights_only) -> tensors."""
    st, bn = os.path.join(directory, SAFETENSORS), os.path.join(directory, BIN)
    if os.path.isfile(st):
        from safetensors import safe_open

        try:
            with safe_open(st, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as e:  # noqa: BLE001 - SafetensorError and OSError alike
            raise AdapterWeightsError(f"{st}: expected a valid safetensors file, found: {e}") from None
    if os.path.isfile(bn):
        try:
            data = torch.load(bn, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError
            raise AdapterWeightsError(
                f"{bn}: expected a tensors-only file that torch.load(weights_only=True) accepts, found: "
                f"{str(e).splitlines()[0]}"
            ) from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise AdapterWeightsError(f"{bn}: expected a dict of tensors, found {type(data).__name__}")
        return data
    raise AdapterWeightsError(f"{directory}: expected {SAFETENSORS} or {BIN}, found neither")


def _override_path(config: LoraConfig, key: str, lora_fqns: set[str]) -> str | None:
    """The model parameter a non-LoRA tensor replaces, or None when it belongs to nothing."""
    path = key.replace(".base_layer.", ".")
    module, _, param = path.rpartition(".")
    if param == "bias" and config.bias in ("all", "lora_only"):
        return path
    if targets.is_module_copy(config, path):
        return path
    if ".base_layer." in key and module in lora_fqns:
        return path  # a targeted layer's own weight, saved alongside (PEFT's save_embedding_layers)
    if module.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES and param == "weight":
        return path
    return None


def build_adapter(config: LoraConfig, tensors: dict[str, torch.Tensor], *, scale: float = 1.0,
                  dtype: torch.dtype | None = None, name: str | None = None, source: str = "adapter",
                  autocast_adapter_dtype: bool = True) -> Adapter:
    """Validate PEFT-format ``tensors`` against ``config``; list every problem in one error."""
    problems: list[str] = []
    parts: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if any(k in key for k in TRAINING_STATE_KEYS) and config.inference_only:
            continue  # a variant's training-only state (VeLoRA, MonteCLoRA); its eval forward is LoRA
        if not key.startswith(PREFIX):
            problems.append(f"{key}: expected a key starting with {PREFIX!r} (PEFT's format)")
            continue
        key = key[len(PREFIX):]
        for suffix, role in _ROLES.items():
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[role] = t
                break
        else:
            rest[key] = t
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            problems.append(f"{key}: expected finite values, found {int((~torch.isfinite(t)).sum())} NaN/inf")
    modules: dict[str, LoraWeights] = {}
    check_targets = isinstance(config.target_modules, list) or (
        isinstance(config.target_modules, str) and config.target_modules != targets.ALL_LINEAR)
    params = parameter_targets(config, set(parts))
    rows = {k: p["lora_a"].shape[0] for k, p in parts.items() if "lora_a" in p and p["lora_a"].dim() == 2}
    experts = expert_keys(config, set(parts), rows, _entry_modules)  # PEFT key path -> (parameter, E)
    bases = {unnested(k)[0] for k in experts}
    unwrapped = {unnested(k)[0] for k in parts}
    matched = {entry: _entry_modules(entry, unwrapped) for entry in config.target_parameters or ()}
    for fqn in sorted(set(parts) - bases):
        names = sorted({e.rpartition(".")[2] for e, fqns in matched.items() if fqn in fqns})
        if len(names) > 1:
            problems.append(f"target_parameters: expected one parameter per module, found several of {fqn!r} "
                            f"({names})")
    for entry, fqns in matched.items():
        if not fqns:
            problems.append(f"target_parameters entry {entry!r}: expected LoRA tensors for module "
                            f"{entry.rpartition('.')[0]!r} (or a module whose name ends with it), found none")
    for fqn, p in parts.items():
        emb = "emb_a" in p or "emb_b" in p
        a, b = (p.get("emb_a"), p.get("emb_b")) if emb else (p.get("lora_a"), p.get("lora_b"))
        what = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        if a is None or b is None:
            missing, found = (what[0], what[1]) if a is None else (what[1], what[0])
            problems.append(f"{fqn}: expected {missing} with {found}, found only {found}")
            continue
        if fqn in experts:
            problems += _expert_weights(config, fqn, *experts[fqn], a, b, scale, dtype, autocast_adapter_dtype, modules)
            continue
        a, b = block_diagonal_factors(config, fqn, a, b)
        if a.dim() >= 3 and not emb:  # a conv: A (r, in, *k), B (out, r / groups, *1)
            if b.dim() != a.dim() or any(d != 1 for d in b.shape[2:]) or not b.shape[1] or a.shape[0] % b.shape[1]:
                problems.append(f"{fqn}: expected a conv LoRA, {what[0]} (r, in, *kernel) and {what[1]} "
                                f"(out, r / groups, *1), found {tuple(a.shape)} and {tuple(b.shape)}")
                continue
        elif a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{fqn}: expected {what[0]} (r, in) and {what[1]} (out, r) with the same r, "
                            f"found {tuple(a.shape)} and {tuple(b.shape)}")
            continue
        r = targets.rank_of(config, fqn)
        if a.shape[0] != r:
            problems.append(f"{fqn}: expected rank {r} from the config (r / rank_pattern), found {a.shape[0]}")
        param, owner = params.get(fqn, (None, fqn))
        if param is not None and (config.use_dora or config.lora_bias):
            problems.append(f"{fqn}.{param}: LoRA on a parameter has no DoRA or lora_bias (PEFT refuses them too)")
        if check_targets and param is None and not targets.is_target(config, fqn):
            problems.append(f"{fqn}: has LoRA tensors, but the config's target_modules does not match it")
        mag, bias = p.get("magnitude"), p.get("bias")
        if config.use_dora and mag is None:
            problems.append(f"{fqn}: expected lora_magnitude_vector (use_dora=true), found none")
        if mag is not None and not config.use_dora:
            problems.append(f"{fqn}: found lora_magnitude_vector, expected none (use_dora=false)")
        if bias is not None and not config.lora_bias:
            problems.append(f"{fqn}: found lora_B.bias, expected none (lora_bias=false)")
        if config.lora_bias and bias is None and not emb:
            problems.append(f"{fqn}: expected lora_B.bias (lora_bias=true), found none")
        conv_mag = (1, b.shape[0], *b.shape[2:]) if a.dim() >= 3 and not emb else (b.shape[0],)
        for role, t, want in (("lora_magnitude_vector", mag, conv_mag), ("lora_B.bias", bias, (b.shape[0],))):
            if t is not None and tuple(t.shape) != want:
                problems.append(f"{fqn}.{role}: expected shape {want}, found {tuple(t.shape)}")

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(adapter_dtype(dtype, t.dtype, autocast_adapter_dtype))

        w_scale = targets.scale_of(config, fqn, scale)
        if owner != fqn:  # an attention's out_proj: PEFT's merge adds its update twice (see parameter_targets)
            w_scale *= 2
        modules[owner] = LoraWeights(cast(a), cast(b), w_scale, cast(mag), cast(bias), emb,
                                     param, None if owner == fqn else fqn)
    overrides: dict[str, torch.Tensor] = {}
    for key, t in rest.items():
        if ".original_module." in key:
            continue  # bias="all" saves the wrapped base module's own tensors too; they are the model's
        path = _override_path(config, key.replace(".modules_to_save.", "."), set(parts))
        if path is None:
            problems.append(f"{key}: a tensor for no module (not LoRA A/B, not modules_to_save, not a bias)")
        else:
            overrides[path] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if not modules and not overrides and not problems:
        problems.append("expected LoRA tensors, found none")
    raise_if(problems, AdapterWeightsError, f"{source}: invalid adapter weights:")
    if any(w.saved_as and not w.experts for w in modules.values()) and not config.inference_only:
        config = dataclasses.replace(config, inference_only=MHA_TRAINING)
    return Adapter(config, modules, overrides, multiplier=scale, name=name)


def _expert_weights(config: LoraConfig, key: str, path: str, experts: int, a: torch.Tensor, b: torch.Tensor,
                    scale: float, dtype: torch.dtype | None, autocast: bool,
                    modules: dict[str, LoraWeights]) -> list[str]:
    """LoRA on a 3-D expert parameter (see :mod:`lora_fx.experts`): checked, then added to
    ``modules`` under the parameter's full name. Returns the problems."""
    r = targets.rank_of(config, path)
    if b.dim() != 2 or b.shape[1] != r * experts:
        return [f"{key}: expected lora_B.weight (out, {r * experts}) for {experts} experts of rank {r} ({path}), "
                f"found {tuple(b.shape)}"]
    if config.use_dora or config.lora_bias:
        return [f"{path}: LoRA on a parameter has no DoRA or lora_bias (PEFT refuses them too)"]
    cast = lambda t: t.to(adapter_dtype(dtype, t.dtype, autocast))  # noqa: E731
    modules[path] = LoraWeights(cast(a), cast(b), targets.scale_of(config, path, scale), param=path.rpartition(".")[2],
                                saved_as=key, experts=experts)
    return []


MHA_TRAINING = ("nn.MultiheadAttention: PEFT's forward adds out_proj's update twice (merged by hand, then by "
                "out_proj.merge) with its gradient through one; lora_fx gives that forward, not that training")


def block_diagonal_factors(config: LoraConfig, fqn: str, a: torch.Tensor,
                           b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BD-LoRA (``use_bdlora``): the factor PEFT stores block-diagonal, (rows, cols / nblocks), as
    the dense block-diagonal matrix it stands for (PEFT's ``weight_as_blockdiagonal_matrix``);
    which factor follows PEFT's rule, a pattern contained in the module's name."""
    bd = config.use_bdlora
    if not bd:
        return a, b
    leaf = fqn.rsplit(".", 1)[-1]
    dense = lambda t: torch.block_diag(*torch.chunk(t, bd["nblocks"], dim=0))  # noqa: E731
    if any(p in leaf for p in bd.get("target_modules_bd_a") or ()):
        return dense(a), b
    if any(p in leaf for p in bd.get("target_modules_bd_b") or ()):
        return a, dense(b)
    return a, b


def _entry_modules(entry: str, fqns: set[str]) -> set[str]:
    """The modules (among ``fqns``) a ``target_parameters`` entry names: as PEFT matches them, the
    parameter's full name equals the entry or ends with "." + the entry ("p.weight" names every
    ``*.p``'s weight)."""
    module, _, param = entry.rpartition(".")
    return {f for f in fqns if f"{f}.{param}" == entry or f"{f}.{param}".endswith(f".{entry}")}


def parameter_targets(config: LoraConfig, fqns: set[str]) -> dict[str, tuple[str, str]]:
    """PEFT key path -> (parameter name, module fqn) for the LoRA that merges into a parameter.

    ``target_parameters`` entries ("lin0.weight"); and nn.MultiheadAttention, which PEFT adapts
    by merging into its in_proj_weight (keys ``mha.lora_A``) and its out_proj's weight (keys
    ``mha.base_layer.out_proj.lora_A``; that module's forward never runs). A module with LoRA
    keys under ``<fqn>.base_layer.out_proj`` is such an attention module. PEFT (0.21) merges the
    out_proj update by hand and then again through ``out_proj.merge``, so its forward (and
    ``merge_and_unload``) has W_out + 2 * scale * B A; lora_fx reproduces that number.
    """
    out: dict[str, tuple[str, str]] = {}
    for name in config.target_parameters or ():
        for fqn in _entry_modules(name, fqns):
            out[fqn] = (name.rpartition(".")[2], fqn)
    for fqn in fqns:
        head, sep, _ = fqn.partition(".base_layer.out_proj")
        if sep and fqn.endswith(".base_layer.out_proj"):
            out[fqn] = ("weight", f"{head}.out_proj")
            if head in fqns:
                out[head] = ("in_proj_weight", head)
    return out


def load_adapter(path: str | os.PathLike, *, scale: float = 1.0, dtype: torch.dtype | None = None,
                 name: str | None = None, autocast_adapter_dtype: bool = True) -> Adapter:
    """Load a PEFT LoRA adapter.

    Args:
        path: a directory with adapter_config.json and adapter_model.safetensors (preferred) or
            adapter_model.bin, or a Hugging Face repo id present in the local cache.
        scale: load-time multiplier on every module's scale (ExLlamaV2's lora_scaling).
        dtype: cast the adapter's tensors to this dtype. None: as PEFT loads them, fp16 / bf16
            tensors in fp32 (the update is computed in fp32, then cast to the model's dtype), other
            dtypes as the file has them.
        name: label for reports and mixed batches (default: the directory's name).
        autocast_adapter_dtype: False keeps fp16 / bf16 tensors as the file has them (PEFT's
            option of that name).

    Returns:
        The validated Adapter.

    Raises:
        AdapterConfigError: missing / invalid config, refused PEFT variant.
        AdapterWeightsError: missing / unreadable weights, unpaired or misshaped tensors, NaN/inf.
    """
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AdapterConfigError(f"scale: expected a finite number, found {scale!r}")
    directory = resolve_path(path)
    config = LoraConfig.from_json(directory)
    tensors = read_tensors(directory)
    name = name or os.path.basename(os.path.normpath(os.fspath(path)))
    return build_adapter(config, tensors, scale=float(scale), dtype=dtype, name=name, source=directory,
                         autocast_adapter_dtype=autocast_adapter_dtype)
