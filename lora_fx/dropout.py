"""``lora_dropout`` in training, as PEFT applies it: y = W x + b + scale * B A dropout(x).

PEFT drops the LoRA input of each module in train mode (``nn.Dropout(p)`` on x before lora_A, a
fresh mask per module and call, kept values scaled by 1 / (1 - p)); the base path never sees it;
in eval mode, and with the adapter disabled, it is the identity. Embedding LoRA has none.

Graphs traced with gradients enabled (training graphs) hold the op for every module when some
adapter the backend was built for (``reserve=`` included) has ``lora_dropout > 0``, written as
``x * (rand_like(x) >= p) / (1 - p)`` with p a 0-d tensor the call sets: the active adapter's
rate while the model is in train mode, 0 otherwise (an exact identity: rand is in [0, 1)). So
``model.train()`` / ``eval()`` and swaps never recompile, and graphs traced under ``no_grad`` /
``inference_mode`` (inference) keep the fast path without it, as do adapters without dropout.
The masks come from torch's RNG (Inductor's own in Inductor graphs): PEFT's distribution, not its
draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from .errors import GraphRewriteError
from .graph import call

aten = torch.ops.aten


class LoraDropout:
    """The dropout rate the compiled graphs read: one 0-d tensor per device, set per call."""

    def __init__(self, slots: Sequence[Sequence[Any]], reserve: Sequence[Sequence[Sequence[Any]]]):
        pool = [a for s in slots for a in s] + [a for r in reserve for s in r for a in s]
        self.compiled = any(a.config.lora_dropout > 0 for a in pool)  # graphs hold the op
        self.tensors: dict[torch.device, torch.Tensor] = {}
        self.value = 0.0
        self._rates: tuple[int, float | str] = (0, 0.0)

    def tensor(self, device: torch.device) -> torch.Tensor:
        if device not in self.tensors:
            with torch.inference_mode(False):
                self.tensors[device] = torch.full((), self.value, dtype=torch.float32, device=device)
        return self.tensors[device]

    def rate(self, adapters: Any) -> float | str:
        """The active adapters' rate, or why one rate cannot stand for them (cached per set)."""
        if self._rates[0] != id(adapters):
            rates = {a.config.lora_dropout for s in adapters.slots for a in s if a.config.lora_dropout > 0}
            several = sum(len(s) for s in adapters.slots) > 1
            why = "mixed-adapter batches" if adapters.mixed else "several adapters summed"
            why = why if rates and several else ""
            self._rates = (id(adapters), why or (rates.pop() if rates else 0.0))
        return self._rates[1]

    def set_for_call(self, adapters: Any, training: bool) -> None:
        """Set the rate the next call reads: the active adapter's in train mode, else 0."""
        rate = self.rate(adapters) if training else 0.0
        if isinstance(rate, str):
            raise GraphRewriteError(
                f"lora_dropout in training: expected one active adapter, found {rate} with lora_dropout > 0 (PEFT "
                "draws a mask per adapter); train one adapter at a time, or set lora_dropout=0")
        if rate != self.value:
            self.value = rate
            for t in self.tensors.values():
                t.fill_(rate)


def drop(graph: fx.Graph, x: fx.Node, p: fx.Node) -> fx.Node:
    """``x * (rand_like(x) >= p) / (1 - p)``: inverted dropout with a runtime rate (0: x itself)."""
    keep = call(graph, aten.ge.Tensor, (call(graph, aten.rand_like.default, (x,)), p))
    kept = call(graph, aten.mul.Tensor, (x, keep))
    return call(graph, aten.div.Tensor, (kept, call(graph, aten.rsub.Scalar, (p, 1.0))))
