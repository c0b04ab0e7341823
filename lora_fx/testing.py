"""Hypothesis strategies for property tests of LoRA on FX graphs.

    from hypothesis import given
    from lora_fx import testing

    @given(testing.models_and_adapters())
    def test_mine(case):
        model, adapter, ids = case
        ...

Needs ``hypothesis`` (and ``transformers`` for Conv1D layers, used when installed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from .adapter import Adapter
from .config import LoraConfig
from .loading import random_adapter
from .targets import linear_like_types


def _conv1d(nx: int, nf: int) -> torch.nn.Module | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    layer = Conv1D(nf, nx)
    torch.nn.init.normal_(layer.weight, std=1 / math.sqrt(nx))
    return layer


class Attention(torch.nn.Module):
    """Single-head attention with q/k/v/o projections (x: [B, S, dim])."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(dim, dim, bias=bias) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.o_proj(att @ v)


class MLP(torch.nn.Module):
    """up (Linear or transformers Conv1D), gelu, down."""

    def __init__(self, dim: int, hidden: int, bias: bool, conv1d: bool):
        super().__init__()
        self.up = (_conv1d(dim, hidden) if conv1d else None) or torch.nn.Linear(dim, hidden, bias=bias)
        self.down = torch.nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


class Block(torch.nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool, conv1d: bool, attention: bool):
        super().__init__()
        self.attn = Attention(dim, bias) if attention else None
        self.mlp = MLP(dim, hidden, bias, conv1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(x)
        return x + self.mlp(x)


class TinyNet(torch.nn.Module):
    """embed -> blocks -> head: token ids [B, S] -> logits [B, S, out]."""

    def __init__(self, vocab: int, dim: int, hidden: int, out: int, blocks: list[dict]):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(Block(dim, hidden, **b) for b in blocks)
        self.head = torch.nn.Linear(dim, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@st.composite
def models(draw: st.DrawFn) -> tuple[TinyNet, torch.Tensor]:
    """A random TinyNet (dims, depth, biases, attention, Conv1D) in eval mode and token ids."""
    vocab, dim = draw(st.integers(5, 24)), draw(st.sampled_from([4, 8, 12, 16]))
    hidden, out = draw(st.sampled_from([8, 16, 24])), draw(st.integers(3, 12))
    blocks = draw(st.lists(st.fixed_dictionaries({
        "bias": st.booleans(), "conv1d": st.booleans(), "attention": st.booleans()}), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = TinyNet(vocab, dim, hidden, out, blocks).eval()
    ids = torch.randint(0, vocab, (draw(st.integers(1, 3)), draw(st.integers(1, 6))),
                        generator=torch.Generator().manual_seed(seed))
    return model, ids


def target_names(model: torch.nn.Module, embeddings: bool = True) -> list[str]:
    """Modules a LoRA adapter can target: Linear, Conv1D and (optionally) Embedding."""
    kinds = (*linear_like_types(), torch.nn.Embedding) if embeddings else linear_like_types()
    return [n for n, m in model.named_modules() if n and isinstance(m, kinds)]


@st.composite
def configs(draw: st.DrawFn, model: torch.nn.Module) -> LoraConfig:
    """A random LoraConfig over ``model``'s modules: ranks and per-module patterns, alpha,
    rsLoRA, DoRA, lora_bias, a random subset of targets (full names or suffixes)."""
    dora = draw(st.booleans())
    lora_bias = not dora and draw(st.booleans())
    names = target_names(model, embeddings=not dora and not lora_bias)
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    targets = [n if draw(st.booleans()) else n.rsplit(".", 1)[-1] for n in chosen]
    r = draw(st.integers(1, 6))
    pattern_keys = st.sampled_from(sorted({n.rsplit(".", 1)[-1] for n in chosen}))
    rank_pattern = draw(st.dictionaries(pattern_keys, st.integers(1, 6), max_size=2))
    alpha_pattern = draw(st.dictionaries(pattern_keys, st.floats(0.5, 16), max_size=2))
    return LoraConfig(r=r, lora_alpha=draw(st.floats(0.5, 32)), target_modules=targets, rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, use_rslora=draw(st.booleans()), use_dora=dora, lora_bias=lora_bias)


@dataclass
class Case:
    """A model, an adapter on it, and inputs."""

    model: TinyNet
    adapter: Adapter
    ids: torch.Tensor


@st.composite
def models_and_adapters(draw: st.DrawFn) -> Case:
    """A random model, a random adapter on it (see ``configs``) and token ids."""
    model, ids = draw(models())
    config = draw(configs(model))
    return Case(model, random_adapter(model, config, seed=draw(st.integers(0, 2**16))), ids)
