"""Conv LoRA across what a user does with it: training, swap, init, in-place fold, exported
graphs, and the setups lora_fx refuses (each error names the module)."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from test_peft_matrix import MODELS, ConvNet, peft_case
from torch import nn

import lora_fx
from lora_fx import LoraConfig
from lora_fx.adapter import regrouped

peft = pytest.importorskip("peft")


def _peft_grads(pm) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_name,kwargs", [("Conv2dGroups2", {"target_modules": ["conv2d", "lin0"]}),
                                               ("Conv3d", {"target_modules": ["conv3d"], "use_dora": True})])
def test_compiled_training_steps_match_peft(tmp_path, model_name, kwargs):
    base, pm, x = peft_case(model_name, kwargs, str(tmp_path))
    adapter = lora_fx.load_adapter(str(tmp_path))
    be = lora_fx.backend(adapter, mode="branch", inner="aot_eager")
    model = torch.compile(copy.deepcopy(base), backend=be)
    ours = torch.optim.SGD(be.parameters(), lr=0.1)
    pm.train()
    lora = [p for n, p in pm.named_parameters() if "lora_A" in n or "lora_B" in n]
    for p in pm.parameters():
        p.requires_grad_(p in set(lora))
    theirs = torch.optim.SGD(lora, lr=0.1)
    conv = "conv2d" if "conv2d" in kwargs["target_modules"] else "conv3d"
    for _ in range(3):
        loss, want = model(x).square().mean(), pm(x).square().mean()
        ours.zero_grad(), theirs.zero_grad()
        loss.backward(), want.backward()
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
        t = be.named_parameters()[conv]
        g = _peft_grads(pm)
        groups = getattr(base, conv).groups
        key = f"base_model.model.{conv}.lora_{{}}.default.weight"
        torch.testing.assert_close(t["lora_a"].grad, g[key.format("A")], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(regrouped(t["lora_b"].grad, groups), g[key.format("B")], atol=1e-5, rtol=1e-5)
        ours.step(), theirs.step()
    if groups > 1:  # the dense B stays block-diagonal: what PEFT's grouped lora_B can hold
        b = be.named_parameters()[conv]["lora_b"].detach()
        blocks = lora_fx.adapter.ungrouped(regrouped(b, groups), groups)
        assert torch.equal(b, blocks)
    trained = be.trained_adapter()
    trained.save(str(tmp_path / "trained"))
    pm.eval()
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "trained")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), pm(x), atol=1e-5, rtol=1e-5)


def test_swap_between_conv_adapters_of_different_ranks_without_recompiling(tmp_path):
    from torch._dynamo.testing import CompileCounterWithBackend

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    base, pa, x = peft_case("Conv2d", {"target_modules": ["conv2d", "lin0"], "r": 2}, str(tmp_path / "a"), seed=1)
    _, pb, _ = peft_case("Conv2d", {"target_modules": ["conv2d"], "r": 6, "lora_alpha": 3}, str(tmp_path / "b"),
                         seed=2)
    a, b = lora_fx.load_adapter(str(tmp_path / "a")), lora_fx.load_adapter(str(tmp_path / "b"))
    be = lora_fx.backend(a, mode="branch", inner="aot_eager", max_rank=6)
    counter = CompileCounterWithBackend(be)
    model = torch.compile(copy.deepcopy(base), backend=counter)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pa(x), atol=1e-4, rtol=1e-4)
        be.swap(b)
        torch.testing.assert_close(model(x), pb(x), atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1


def test_init_adapter_on_convs_is_peft_shaped_and_starts_at_the_base(tmp_path):
    base = MODELS["Conv2dGroups2"][0]()
    cfg = dict(target_modules=["conv2d"], r=4, use_dora=True)
    ours = lora_fx.init_adapter(base, LoraConfig(**cfg), seed=0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    sd = peft.get_peft_model_state_dict(pm)
    for key, t in ours.state_dict().items():
        assert tuple(t.shape) == tuple(sd[key].shape), key
    mag = sd["base_model.model.conv2d.lora_magnitude_vector"]
    torch.testing.assert_close(ours.modules["conv2d"].magnitude, mag)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(lora_fx.lora_forward(base, ours, x), base(x))


def test_in_place_fold_of_a_conv_matches_peft_and_restores_bit_for_bit(tmp_path):
    base, pm, x = peft_case("Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}, str(tmp_path))
    model = copy.deepcopy(base)
    before = model.conv3d.weight.detach().clone()
    be = lora_fx.backend(lora_fx.load_adapter(str(tmp_path)), mode="fold", inplace=True, inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), pm(x), atol=1e-4, rtol=1e-4)
        assert not torch.equal(model.conv3d.weight, before)
        be.restore()
        assert torch.equal(model.conv3d.weight, before)


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_exported_and_traced_graphs_with_convs_match_peft(tmp_path, mode):
    base, pm, x = peft_case("Conv2d", {"target_modules": ["conv2d", "lin0"], "lora_bias": True}, str(tmp_path))
    adapter = lora_fx.load_adapter(str(tmp_path))
    with torch.no_grad():
        want = pm(x)
        ep = lora_fx.rewrite(torch.export.export(copy.deepcopy(base), (x,)), lora_fx.RewriteConfig(adapter, mode=mode))
        torch.testing.assert_close(ep.module()(x), want, atol=1e-4, rtol=1e-4)
        gm = torch.fx.symbolic_trace(copy.deepcopy(base))
        report = lora_fx.rewrite(gm, lora_fx.RewriteConfig(adapter, mode=mode))
        assert "conv2d" in report.modules
        torch.testing.assert_close(gm(x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("conv,why", [
    (nn.Conv2d(4, 6, 3, dilation=2), "conv: dilation=(2, 2): PEFT's lora_A is not dilated"),
    (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), "conv: padding_mode='reflect': PEFT's lora_A pads"),
    (nn.Conv2d(4, 6, 3, groups=2), "conv: rank 3 with groups=2: expected a rank divisible by groups"),
])
def test_convs_peft_lora_cannot_express_are_refused_by_name(conv, why):
    model = ConvNet("conv", conv)
    with pytest.raises(lora_fx.AdapterConfigError, match=re.escape(why)):
        lora_fx.init_adapter(model, LoraConfig(target_modules=["conv"], r=3))


def test_a_dilated_conv_in_a_graph_is_refused_by_name():
    from lora_fx.loading import random_adapter

    model = ConvNet("conv", nn.Conv2d(4, 6, 3, padding=2))
    adapter = random_adapter(model, LoraConfig(target_modules=["conv"], r=2))
    model.conv.dilation = (2, 2)  # changed after the adapter was made: the graph's op is dilated
    compiled = torch.compile(model, backend=lora_fx.backend(adapter, inner="eager"))
    with pytest.raises(lora_fx.GraphRewriteError, match="conv: dilation=.*expected dilation 1"):
        compiled(torch.randn(1, 4, 8, 8))


def test_in_place_fold_of_a_grouped_conv_is_refused_by_name():
    from lora_fx.loading import random_adapter

    model = ConvNet("conv", nn.Conv2d(4, 6, 3, groups=2))
    adapter = random_adapter(model, LoraConfig(target_modules=["conv"], r=2))
    compiled = torch.compile(model, backend=lora_fx.backend(adapter, mode="fold", inplace=True, inner="eager"))
    with pytest.raises(lora_fx.GraphRewriteError, match="conv: groups=2: .* use inplace=False"):
        compiled(torch.randn(1, 4, 8, 8))


def test_mixed_batches_over_a_conv_are_refused_by_name():
    from lora_fx.loading import random_adapter

    model = ConvNet("conv", nn.Conv2d(4, 6, 3))
    a = random_adapter(model, LoraConfig(target_modules=["conv"], r=2), seed=1)
    b = random_adapter(model, LoraConfig(target_modules=["conv"], r=2), seed=2)
    be = lora_fx.backend({"a": a, "b": b}, inner="eager")
    be.select(["a", "b"])
    compiled = torch.compile(model, backend=be)
    with pytest.raises(lora_fx.GraphRewriteError, match="conv: mixed-adapter batches over a convolution"):
        compiled(torch.randn(2, 4, 8, 8))


def test_branch_conv_with_a_narrower_adapter_keeps_the_models_dtype():
    from lora_fx.loading import random_adapter

    model = ConvNet("conv", nn.Conv2d(4, 6, 3, padding=1))
    adapter = random_adapter(model, LoraConfig(target_modules=["conv"], r=4), seed=1)
    bf16 = lora_fx.Adapter(adapter.config, {k: dataclasses.replace(w, lora_a=w.lora_a.bfloat16(),
                                                                   lora_b=w.lora_b.bfloat16())
                                            for k, w in adapter.modules.items()})
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = lora_fx.lora_forward(model, bf16, x)  # PEFT's math: fp32 result + the bf16 update
        got = torch.compile(copy.deepcopy(model), backend=lora_fx.backend(bf16, inner="aot_eager"))(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_unbatched_conv_input_matches_the_reference(mode):
    from lora_fx.loading import random_adapter

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 2, 3)).eval()

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):  # (C, H, W) -> conv2d -> (C', H, W) -> flatten to (C', H*W) -> conv1d
            return self.net[2](self.net[1](self.net[0](x)).flatten(1))

    m = Unbatched().eval()
    adapter = random_adapter(m, LoraConfig(target_modules=["net.0", "net.2"], r=3), seed=2)
    x = torch.randn(3, 4, 5)
    with torch.no_grad():
        want = lora_fx.lora_forward(m, adapter, x)
        assert (want - m(x)).abs().max() > 1e-3
        got = torch.compile(copy.deepcopy(m), backend=lora_fx.backend(adapter, mode=mode, inner="aot_eager"))(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_padding_inside_the_module_is_refused_on_an_exported_graph():
    from lora_fx.loading import random_adapter

    model = ConvNet("conv", nn.Conv2d(4, 6, 3, padding=1))
    adapter = random_adapter(model, LoraConfig(target_modules=["conv"], r=2))
    model.conv.padding_mode = "reflect"  # the adapter was made before; the graph pads inside the module
    ep = torch.export.export(model, (torch.randn(1, 4, 6, 6),))
    with pytest.raises(lora_fx.GraphRewriteError, match="conv: its input is padded inside the module"):
        lora_fx.rewrite(ep, lora_fx.RewriteConfig(adapter, mode="branch"))


@pytest.mark.parametrize("mode,inplace", [("branch", False), ("fold", False), ("fold", True)])
def test_conv_adapter_through_set_scale_disable_and_an_edited_weight(mode, inplace):
    from lora_fx.loading import random_adapter

    model = ConvNet("conv", nn.Conv2d(4, 6, 3, padding=1))
    adapter = random_adapter(model, LoraConfig(target_modules=["conv", "lin0"], r=3, use_dora=True), seed=5)
    reference = copy.deepcopy(model)
    be = lora_fx.backend(adapter, mode=mode, inplace=inplace, inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lora_fx.lora_forward(reference, adapter, x), atol=1e-4, rtol=1e-4)
        be.set_scale(0.5)
        torch.testing.assert_close(compiled(x), lora_fx.lora_forward(reference, adapter.scaled(0.5), x),
                                   atol=1e-4, rtol=1e-4)
        if not inplace:  # an edit with no settings change: W' and DoRA's norms must follow it
            model.conv.weight.add_(0.1)
            reference.conv.weight.add_(0.1)
            torch.testing.assert_close(compiled(x), lora_fx.lora_forward(reference, adapter.scaled(0.5), x),
                                       atol=1e-4, rtol=1e-4)
        be.disable()
        torch.testing.assert_close(compiled(x), reference(x), atol=1e-5, rtol=1e-5)
        if inplace:
            be.restore()
        model.conv.weight.mul_(1.5)  # an edited base weight (while the adapter is off, for in-place fold)
        reference.conv.weight.mul_(1.5)
        be.enable()
        torch.testing.assert_close(compiled(x), lora_fx.lora_forward(reference, adapter.scaled(0.5), x),
                                   atol=1e-4, rtol=1e-4)
