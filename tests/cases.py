"""Tiny random-weight transformers models and PEFT-saved adapters for the PEFT-oracle tests."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch

VOCAB = 64


def examples(n: int) -> int:
    """A property test's example count: ``n`` in CI, 25x with HYPOTHESIS_PROFILE=thorough."""
    return n * 25 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else n


def tiny_model(arch: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A small random-weight transformers model of architecture ``arch``, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=2))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2))
    elif arch == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common, num_key_value_heads=4, pad_token_id=0))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                                 n_positions=128, bos_token_id=0, eos_token_id=0))
    elif arch == "bert":
        model = tf.BertModel(tf.BertConfig(**common, max_position_embeddings=128), add_pooling_layer=False)
    else:
        raise ValueError(arch)
    return model.eval()


@dataclass
class Case:
    """One PEFT-oracle case: an architecture and the PEFT LoraConfig kwargs of its adapter."""

    name: str
    arch: str
    peft_kwargs: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("llama_qv", "llama", dict(target_modules=["q_proj", "v_proj"])),
    Case("llama_all_linear_rslora", "llama", dict(target_modules="all-linear", use_rslora=True, r=8, lora_alpha=16)),
    Case("llama_dora", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    Case("llama_patterns", "llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], r=4,
                                         rank_pattern={"k_proj": 2, "layers.1.self_attn.q_proj": 6},
                                         alpha_pattern={"v_proj": 3, "up_proj": 32},
                                         layers_to_transform=[1], layers_pattern="layers")),
    Case("llama_regex_exclude", "llama", dict(target_modules=r".*\.(mlp|self_attn)\.\w+_proj",
                                              exclude_modules=["o_proj", "gate_proj"])),
    Case("llama_embedding", "llama", dict(target_modules=["embed_tokens", "q_proj"])),
    Case("gpt2_conv1d", "gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    Case("qwen2_lora_bias", "qwen2", dict(target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], lora_bias=True)),
    Case("phi3_fused", "phi3", dict(target_modules=["qkv_proj", "gate_up_proj"])),
    Case("bert_query_value", "bert", dict(target_modules=["query", "value"])),
    Case("gpt2_bias_all_modules_to_save", "gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True,
                                                       bias="all", modules_to_save=["ln_f"])),
]
CASE_IDS = [c.name for c in CASES]


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Give every trainable (adapter) tensor non-trivial values, DoRA magnitudes included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                if "magnitude" in name:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
                else:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))


def peft_adapter(case: Case, directory: str, seed: int = 1) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base model, PEFT model) for ``case``; the PEFT adapter is saved to ``directory``."""
    import peft

    base = tiny_model(case.arch)
    kwargs = dict(r=4, lora_alpha=8, init_lora_weights=False)
    kwargs.update(case.peft_kwargs)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    perturb(pm, seed)
    pm.eval()
    pm.save_pretrained(directory)
    assert os.path.isfile(os.path.join(directory, "adapter_model.safetensors"))
    return base, pm


def two_adapters_peft(directory) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    """(base llama, PEFT model with adapters "a" and "b" both active, their saved directories)."""
    import peft

    cfgs = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            dict(r=2, lora_alpha=3, target_modules=["v_proj", "up_proj"], init_lora_weights=False, use_rslora=True)]
    base = tiny_model("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfgs[0]), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(**cfgs[1]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(directory))
    pm.base_model.set_adapter(["a", "b"])
    return base, pm.eval(), [os.path.join(str(directory), n) for n in ("a", "b")]


def train(compiled: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, steps: int, between=None) -> None:
    """``steps`` SGD steps of a causal LM on ``ids`` (``between()`` after each)."""
    for _ in range(steps):
        loss = compiled(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if between is not None:
            between()


def example_ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
