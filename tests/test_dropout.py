"""lora_dropout as PEFT applies it: in train mode the LoRA input of each module is dropped (one mask
per module and call, kept values scaled by 1 / (1 - p)), the base path never; in eval mode, under
``be.disabled()`` and in inference graphs it is the identity. PEFT is the oracle where its numbers
are deterministic (eval), and for the distribution of the training gradients.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from cases import example_ids, logits, tiny_model

import lora_fx


class TwoHeads(torch.nn.Module):
    """Two square linears reading the same input (as q / k do): r = in makes B A invertible, so
    each module's dropped input can be read back from its update."""

    def __init__(self, n: int = 8):
        super().__init__()
        self.q, self.k = torch.nn.Linear(n, n), torch.nn.Linear(n, n)

    def forward(self, x):
        return self.q(x), self.k(x)


def compiled_with_dropout(model: torch.nn.Module, p: float, **config):
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(lora_dropout=p, init_lora_weights=False, **config))
    bare, adapters = lora_fx.from_peft(copy.deepcopy(pm))
    be = lora_fx.backend(adapters["default"], inner="aot_eager")
    be.parameters()  # a training graph: A / B need gradients
    return pm, bare, be, torch.compile(bare, backend=be)


def test_each_module_drops_its_own_input_and_never_the_base_path():
    p = 0.4
    pm, bare, be, compiled = compiled_with_dropout(TwoHeads(), p, r=8, lora_alpha=8, target_modules=["q", "k"])
    adapter = be.trained_adapter()
    bare.train()
    x = torch.randn(256, 8)
    masks = []
    for name, out in zip(("q", "k"), compiled(x)):
        mod, w = getattr(bare, name), adapter.modules[name]
        update = (out - torch.nn.functional.linear(x, mod.weight, mod.bias)).detach().double()
        a, b = w.lora_a.double(), w.lora_b.double()
        dropped = (update / w.scale) @ torch.linalg.inv(b).T @ torch.linalg.inv(a).T  # dropout(x), read back
        kept = (dropped - x.double() / (1 - p)).abs() < 1e-3
        assert bool((kept | (dropped.abs() < 1e-3)).all()), f"{name}: dropout(x) is not x * mask / (1 - p)"
        clear = x.abs() > 1e-2  # where kept and dropped cannot be confused
        n = int(clear.sum())
        assert abs(kept[clear].double().mean().item() - (1 - p)) < 3 * (p * (1 - p) / n) ** 0.5
        masks.append(kept[clear])
    assert not torch.equal(masks[0], masks[1]), "q and k share one mask; PEFT draws one per module"
    with torch.no_grad():
        again = compiled(x)[0]
    assert not torch.equal(again, compiled(x)[0].detach()), "a new mask per call"
    with be.disabled():
        torch.testing.assert_close(compiled(x)[0], torch.nn.functional.linear(x, bare.q.weight, bare.q.bias))


@pytest.mark.parametrize("grad", [True, False])
def test_eval_mode_equals_peft(grad):
    pm, bare, be, compiled = compiled_with_dropout(tiny_model("llama"), 0.1, r=4, lora_alpha=8,
                                                   target_modules=["q_proj", "v_proj", "down_proj"])
    pm.eval(), bare.eval()
    ids = example_ids()
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), atol=1e-4, rtol=1e-4)
        bare.train()  # train mode: the adapter off leaves the base model, whatever the rate
        with be.disabled(), pm.disable_adapter():
            torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), atol=1e-4, rtol=1e-4)

def test_training_gradients_follow_peft_distribution():
    """The mean and the mean square of A's and B's gradients over 200 dropout draws lie within 3
    standard errors of PEFT's (no dropout, or dropout on the base path, gives other moments)."""
    p, n = 0.3, 200
    pm, bare, be, compiled = compiled_with_dropout(tiny_model("llama", layers=1), p, r=4, lora_alpha=8,
                                                   target_modules=["q_proj", "v_proj"])
    pm.train(), bare.train()
    ids = example_ids(batch=2, seq=6)
    fqn = "model.layers.0.self_attn.v_proj"
    ours_a, ours_b = be.named_parameters()[fqn]["lora_a"], be.named_parameters()[fqn]["lora_b"]
    layer = pm.base_model.model.model.layers[0].self_attn.v_proj
    theirs_a, theirs_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    direction = torch.Generator().manual_seed(5)

    def draws(model, a, b):
        out = []
        for seed in range(n):
            torch.manual_seed(seed)
            a.grad = b.grad = None
            model(input_ids=ids, labels=ids).loss.backward()
            out.append(torch.cat([a.grad[: theirs_a.shape[0]].flatten(), b.grad[:, : theirs_b.shape[1]].flatten()]))
        return torch.stack(out).double()

    ours, peft_ = draws(compiled, ours_a, ours_b), draws(pm, theirs_a, theirs_b)
    probes = torch.randn(ours.shape[1], 4, generator=direction, dtype=torch.float64)
    for stat in (lambda g: g @ probes, lambda g: (g @ probes) ** 2):
        x, y = stat(ours), stat(peft_)
        se = (x.var(0) / n + y.var(0) / n).sqrt()
        assert bool(((x.mean(0) - y.mean(0)).abs() <= 3 * se).all()), (x.mean(0), y.mean(0), se)
    assert bool(ours.var(0).sum() > 0), "no dropout drawn"
