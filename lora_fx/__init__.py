"""lora_fx: apply PEFT LoRA adapters inside torch.compile by rewriting the FX graph."""

from .adapter import Adapter, LoraWeights
from .config import LoraConfig
from .errors import (
    AdapterConfigError,
    AdapterWeightsError,
    GraphRewriteError,
    LoraFxError,
    ModelMismatchError,
    SwapError,
)
from .loading import init_adapter, load_adapter
from .reference import apply_lora, lora_forward, merged_state_dict

__all__ = [
    "Adapter",
    "AdapterConfigError",
    "AdapterWeightsError",
    "GraphRewriteError",
    "LoraConfig",
    "LoraFxError",
    "LoraWeights",
    "ModelMismatchError",
    "SwapError",
    "apply_lora",
    "init_adapter",
    "load_adapter",
    "lora_forward",
    "merged_state_dict",
]
__version__ = "0.1.0"
