"""LoraConfig: the fields of PEFT's adapter_config.json that lora_fx implements.

Field names and meanings are PEFT's (peft.LoraConfig). Fields whose forward is not plain LoRA are
refused by name; fields lora_fx does not know are ignored with a debug log, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterConfigError, raise_if

log = logging.getLogger(__name__)

# Fields that change the forward beyond plain LoRA / DoRA. A non-default value is refused.
REFUSED_FIELDS: dict[str, str] = {
    "alora_invocation_tokens": "activated LoRA (aLoRA) changes the forward per token",
    "kasa_config": "KaSA changes the forward",
    "arrow_config": "Arrow routing changes the forward",
    "use_qalora": "QA-LoRA pools the input",
    "layer_replication": "layer replication changes the model's structure",
    "trainable_token_indices": "trainable tokens change the embedding per token",
    "megatron_config": "Megatron parallel layers are not supported",
}
# Variants whose eval forward is plain LoRA but whose training is not: applied for inference,
# training (``be.parameters()``) refused by name. The value: what differs in training.
INFERENCE_ONLY_FIELDS: dict[str, str] = {
    "velora_config": "VeLoRA trains with compressed activations in the backward",
    "use_velora": "VeLoRA trains with compressed activations in the backward",
    "monteclora_config": "MonteCLoRA samples A's perturbations while training",
    "init_lora_weights": "MiCA (init_lora_weights='mica') trains A only, with B frozen",
    "use_bdlora": "BD-LoRA trains block-diagonal factors; lora_fx holds them dense",
}
# per-module state of those variants that only training reads (suffixes of the saved keys)
TRAINING_STATE_KEYS = (".lora_velora_embed", ".lora_monteclora_sampler.")

BIAS_CHOICES = ("none", "all", "lora_only")

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the architectures we test, plus
# phi3, for which PEFT has no default: its fused qkv_proj plays the role of q/v.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


@dataclass
class LoraConfig:
    """A LoRA adapter's configuration, with PEFT's field names.

    Args:
        r: default rank.
        lora_alpha: default alpha; scale = lora_alpha / r (or / sqrt(r) with ``use_rslora``).
        target_modules: list (exact or suffix match), regex string (fullmatch), "all-linear", or
            None for the architecture's default.
        exclude_modules: str (fullmatch) or list (exact or suffix match).
        layers_to_transform, layers_pattern: restrict targets to these layer indices.
        rank_pattern, alpha_pattern: per-module rank / alpha, first matching key wins.
        use_rslora, use_dora, fan_in_fan_out, bias, lora_bias, modules_to_save: as in PEFT.
        target_parameters: "module.param" names whose parameter gets W + scale * B A (PEFT's
            ParamWrapper), 2-D parameters.
        use_bdlora: BD-LoRA's block-diagonal factors (``target_modules_bd_a`` / ``_bd_b``,
            ``nblocks``); the loaded factors are made dense, the same LoRA.
        inference_only: set when loading a variant whose eval forward is plain LoRA but whose
            training differs (VeLoRA, MonteCLoRA, MiCA): why ``parameters()`` refuses to train it.

    Raises:
        AdapterConfigError: listing every field with a wrong type or value.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: list[str] | None = None
    target_parameters: list[str] | None = None
    use_bdlora: dict[str, Any] | None = None
    base_model_name_or_path: str | None = None
    lora_dropout: float = 0.0
    task_type: str | None = None
    inference_only: str | None = field(default=None, compare=False)  # why training is refused (a variant)

    def __post_init__(self) -> None:
        raise_if(self._type_problems(), AdapterConfigError, "invalid LoRA config:")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)

    def _type_problems(self) -> list[str]:
        p: list[str] = []

        def is_str_list(v: Any) -> bool:
            return isinstance(v, (list, tuple, set)) and all(isinstance(x, str) for x in v)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.r) or self.r <= 0:
            p.append(f"r: expected a positive int, found {self.r!r}")
        if not is_num(self.lora_alpha):
            p.append(f"lora_alpha: expected a number, found {self.lora_alpha!r}")
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str) and not is_str_list(v):
                p.append(f"{name}: expected a string, a list of strings or null, found {v!r}")
        v = self.layers_to_transform
        if v is not None and not is_int(v) and not (isinstance(v, list) and all(map(is_int, v))):
            p.append(f"layers_to_transform: expected an int, a list of ints or null, found {v!r}")
        v = self.layers_pattern
        if v is not None and not isinstance(v, str) and not is_str_list(v):
            p.append(f"layers_pattern: expected a string, a list of strings or null, found {v!r}")
        for name, check, what in (
            ("rank_pattern", lambda x: is_int(x) and x > 0, "positive ints"),
            ("alpha_pattern", is_num, "numbers"),
        ):
            v = getattr(self, name)
            if not isinstance(v, dict) or not all(isinstance(k, str) and check(x) for k, x in v.items()):
                p.append(f"{name}: expected a mapping of module patterns to {what}, found {v!r}")
        for name in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                p.append(f"{name}: expected true or false, found {getattr(self, name)!r}")
        if self.bias not in BIAS_CHOICES:
            p.append(f"bias: expected one of {BIAS_CHOICES}, found {self.bias!r}")
        if self.target_parameters is not None and not is_str_list(self.target_parameters):
            p.append(f"target_parameters: expected a list of strings or null, found {self.target_parameters!r}")
        if self.use_bdlora is not None and not (isinstance(self.use_bdlora, dict)
                                                and isinstance(self.use_bdlora.get("nblocks"), int)):
            p.append(f"use_bdlora: expected a mapping with an int nblocks (PEFT's BdLoraConfig), "
                     f"found {self.use_bdlora!r}")
        if self.modules_to_save is not None and not is_str_list(self.modules_to_save):
            p.append(f"modules_to_save: expected a list of strings or null, found {self.modules_to_save!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            p.append(f"base_model_name_or_path: expected a string or null, found {self.base_model_name_or_path!r}")
        if not is_num(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            p.append(f"lora_dropout: expected a number in [0, 1), found {self.lora_dropout!r}")
        if self.use_dora is True and self.lora_bias is True:
            p.append("use_dora and lora_bias: expected at most one of them, found both (PEFT refuses this too)")
        return p

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "adapter config") -> LoraConfig:
        """Build from a parsed adapter_config.json, refusing variants lora_fx does not implement."""
        if not isinstance(data, dict):
            raise AdapterConfigError(f"{source}: expected a JSON object, found {type(data).__name__}")
        problems: list[str] = []
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            problems.append(f"peft_type: expected 'LORA', found {peft_type!r}")
        for name, why in REFUSED_FIELDS.items():
            if data.get(name) not in (None, False, {}, []):
                problems.append(f"{name}: not supported ({why}), found {data[name]!r}")
        raise_if(problems, AdapterConfigError, f"{source} asks for what lora_fx does not implement:")
        def inference_only_value(name: str) -> bool:
            v = data.get(name)
            return v == "mica" if name == "init_lora_weights" else v not in (None, False, {}, [])

        inference_only = [f"{name}: {why}" for name, why in INFERENCE_ONLY_FIELDS.items() if inference_only_value(name)]
        known = {f.name for f in dataclasses.fields(cls)} - {"inference_only"}
        unknown = sorted(set(data) - known - set(REFUSED_FIELDS) - set(INFERENCE_ONLY_FIELDS) - {"peft_type"})
        if unknown:
            log.debug("%s: ignoring fields %s", source, unknown)
        kwargs = {k: v for k, v in data.items() if k in known}
        for k in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(k) is None:
                kwargs.pop(k, None)
        if inference_only:
            kwargs["inference_only"] = "; ".join(inference_only)
        try:
            return cls(**kwargs)
        except AdapterConfigError as e:
            raise AdapterConfigError(e.problems, header=f"{source} is invalid:") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LoraConfig:
        """Read ``adapter_config.json`` (a file, or a directory holding it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "adapter_config.json")
        if not os.path.isfile(path):
            raise AdapterConfigError(f"{path}: expected a PEFT adapter_config.json, found no such file")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterConfigError(f"{path}: expected valid JSON, found a parse error: {e}") from None
        return cls.from_dict(data, source=path)

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json that PEFT's ``LoraConfig.from_pretrained`` reads."""
        d = dataclasses.asdict(self)
        d.pop("inference_only")
        if isinstance(d["target_modules"], (set, tuple)):
            d["target_modules"] = sorted(d["target_modules"])
        d["peft_type"] = "LORA"
        d["inference_mode"] = True
        return d
