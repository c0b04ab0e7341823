"""Every parameter PEFT trains gets PEFT's gradient through lora_fx's compiled graphs, or the
training is refused naming it: a base trained under a fold backend (a full fine-tune)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import example_ids, perturb, tiny_model

import lora_fx
from lora_fx import GraphRewriteError

peft = pytest.importorskip("peft")

TOL = dict(atol=1e-5, rtol=1e-5)


def _peft(base: torch.nn.Module, **kwargs) -> torch.nn.Module:
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                  **kwargs))
    perturb(pm, 1)
    return pm


def _base_named(pm: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """PEFT's base parameters under the base model's own names."""
    return {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in pm.named_parameters()
            if "lora_" not in n and "modules_to_save" not in n}


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize(("arch", "kwargs"), [
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_bias=True)),
])
def test_fold_over_a_trained_base_gives_the_base_peft_gradients(arch, kwargs):
    """The folded op reads W' + (W - W.detach()): W''s value, W''s gradient on W, which is PEFT's
    gradient of its base weight (and of the base bias a lora_bias folds into). Two SGD steps of
    the whole base, the adapter fixed (fold does not train A / B): the gradients of the first, the
    losses of both (the second reads W' folded again over the trained W) and the trained weights
    equal PEFT's at 1e-5."""
    base = tiny_model(arch)
    pm = _peft(base, **kwargs)
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" not in n)
    adapter = lora_fx.from_peft(copy.deepcopy(pm))[1]["default"]
    model = copy.deepcopy(base)
    compiled = torch.compile(model, backend=lora_fx.backend(adapter, mode="fold", inner="aot_eager"))
    ours, theirs = dict(model.named_parameters()), _base_named(pm)
    assert ours.keys() == theirs.keys()
    opts = [torch.optim.SGD(m.values(), lr=0.1) for m in (ours, theirs)]
    ids = example_ids()
    with torch.no_grad():
        assert (_loss(pm, ids) - _loss(base, ids)).abs() > 1e-3  # the adapter changes the model
    for step in range(2):
        for opt in opts:
            opt.zero_grad()
        loss, want = _loss(compiled, ids), _loss(pm, ids)
        loss.backward()
        want.backward()
        torch.testing.assert_close(loss, want, **TOL)
        missing = [n for n, p in ours.items() if p.grad is None]
        assert missing == []
        if step == 0:  # the second's differ by fold's rounding (W' x vs W x + B A x) carried through a step
            torch.testing.assert_close({n: p.grad for n, p in ours.items()}, {n: p.grad for n, p in theirs.items()},
                                       **TOL)
        for opt in opts:
            opt.step()
    torch.testing.assert_close({n: p.detach() for n, p in ours.items()}, {n: p.detach() for n, p in theirs.items()},
                               **TOL)


@pytest.mark.parametrize("inplace", [False, True])
def test_fold_refuses_the_backward_where_a_trained_base_would_miss_peft_gradient(inplace):
    """DoRA's folded weight scales W's gradient per row, in place the model's tensor holds W', and
    a modules_to_save copy replaces the model's parameter: a forward with gradients on still runs
    (an inference call that did not turn them off); a backward through it is refused, naming each."""
    base = tiny_model("llama")
    pm = _peft(base, target_modules=["q_proj"], use_dora=not inplace, modules_to_save=["lm_head"])
    adapter = lora_fx.from_peft(copy.deepcopy(pm))[1]["default"]
    model = copy.deepcopy(base)
    compiled = torch.compile(model, backend=lora_fx.backend(adapter, mode="fold", inner="aot_eager",
                                                            inplace=inplace))
    ids = example_ids()
    loss = _loss(compiled, ids)
    with torch.no_grad():
        torch.testing.assert_close(loss, _loss(pm, ids), **TOL)
    with pytest.raises(GraphRewriteError, match="cannot train through this graph") as e:
        loss.backward()
    why = "fold in place merges B A" if inplace else "DoRA folds W'"
    assert [p.split(":")[0] for p in e.value.problems] == [f"model.layers.{i}.self_attn.q_proj.weight"
                                                           for i in range(2)] + ["lm_head.weight"]
    assert all(why in p for p in e.value.problems[:2])
    assert all(p.grad is None for p in model.parameters())
