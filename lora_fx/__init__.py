"""lora_fx: apply PEFT LoRA adapters inside torch.compile by rewriting the FX graph."""

from .adapter import Adapter, LoraWeights
from .backend import LoraBackend, backend
from .config import LoraConfig
from .diffusers import PipelineLora, load_diffusers_lora
from .errors import (
    AdapterConfigError,
    AdapterWeightsError,
    GraphRewriteError,
    LoraFxError,
    ModelMismatchError,
    RecompileLimitError,
    StaleWeightError,
    SwapError,
    UnpicklableError,
)
from .finetune import for_training
from .loading import init_adapter, load_adapter
from .logs import set_logs
from .package import LoraPackage, PackageInputError, export, load_package
from .peft_model import PeftAdapters, from_peft
from .pipeline import LoraPipeline, compile_pipeline
from .reference import apply_lora, lora_forward, merged_state_dict
from .rewrite import RewriteConfig, RewriteReport, rewrite

__all__ = [
    "Adapter",
    "AdapterConfigError",
    "AdapterWeightsError",
    "GraphRewriteError",
    "LoraBackend",
    "LoraConfig",
    "LoraFxError",
    "LoraPackage",
    "LoraPipeline",
    "LoraWeights",
    "ModelMismatchError",
    "PackageInputError",
    "PeftAdapters",
    "PipelineLora",
    "RecompileLimitError",
    "RewriteConfig",
    "RewriteReport",
    "StaleWeightError",
    "SwapError",
    "UnpicklableError",
    "apply_lora",
    "backend",
    "compile_pipeline",
    "export",
    "for_training",
    "from_peft",
    "init_adapter",
    "load_adapter",
    "load_diffusers_lora",
    "load_package",
    "lora_forward",
    "merged_state_dict",
    "rewrite",
    "set_logs",
]
__version__ = "0.1.0"
