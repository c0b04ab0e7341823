"""What a benchmark times: the Llama model at today's shapes, random PEFT-format adapters for it,
the inputs of each workload (prefill, decode, decode b8, generate), one call timed, and the bytes
a model's weights keep in memory.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

WORKLOADS = ("prefill", "decode", "decode b8", "generate")
CACHE_KW = "cache" if "cache" in __import__("inspect").signature(
    __import__("transformers").LlamaForCausalLM.forward).parameters else "past_key_values"
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    ratio, groups = getattr(args, "mlp_ratio", 3.5), getattr(args, "kv_groups", 4)  # today's shapes by default
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=int(args.hidden * ratio) // 8 * 8, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // groups),
                      max_position_embeddings=4096)
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    return LlamaForCausalLM(cfg).eval().to(getattr(args, "device", "cpu"), dtype)


def make_adapter(model, args, seed: int, out_dir: str):
    import lora_fx
    from lora_fx.loading import random_adapter

    cfg = lora_fx.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJ)
    ad = random_adapter(model.cpu().float(), cfg, seed=seed, std=0.02)
    model.to(args.device, getattr(torch, args.dtype))
    ad.save(out_dir)
    return lora_fx.load_adapter(out_dir)


class Inputs:
    """Inputs per workload; decode caches are cropped back to the prompt length after each call."""

    def __init__(self, args):
        gen = torch.Generator().manual_seed(0)
        self.args = args
        self.prefill = torch.randint(0, args.vocab, (1, args.seq), generator=gen).to(args.device)
        self.prompt = {b: torch.randint(0, args.vocab, (b, args.seq), generator=gen).to(args.device) for b in (1, 8)}
        self.step = {b: torch.randint(0, args.vocab, (b, 1), generator=gen).to(args.device) for b in (1, 8)}

    def workload(self, model, name: str) -> Callable[[], object]:
        if name == "prefill":
            return lambda: model(input_ids=self.prefill, use_cache=False)
        if name == "generate":
            ids = self.prompt[1][:, :16]
            return lambda: model.generate(ids, max_new_tokens=self.args.new_tokens, do_sample=False,
                                          min_new_tokens=self.args.new_tokens, pad_token_id=0)
        b = 8 if name == "decode b8" else 1
        # the KV cache is filled by the model's own uncompiled forward: the prompt's graph is not
        # what this workload times, and compiling it for every variant would double the run
        eager = getattr(model.forward, "_torchdynamo_orig_callable", model.forward)
        first = eager(input_ids=self.prompt[b], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values  # transformers 5 / 4 name

        def step():
            out = model(input_ids=self.step[b], **{CACHE_KW: cache}, use_cache=True)
            cache.crop(-1)  # back to the prompt length
            return out

        return step


def sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, args) -> float:
    sync(args)
    t = time.perf_counter()
    fn()
    sync(args)
    return time.perf_counter() - t


def compiled_forward(model, backend=None):
    model.forward = torch.compile(model.forward, backend=backend or "inductor", dynamic=True)
    return model


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` keeps in memory: a quantized tensor subclass (torchao) counts its inner tensors,
    not its logical shape times its logical dtype."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weights_bytes(model, be=None) -> int:
    n = sum(stored_bytes(p) for p in model.parameters())
    if be is not None:
        n += sum(stored_bytes(t) for t in be.state.held())
    return n
