"""The settings tested as hard as the adapters: ``set_scale`` (0, 0.5, 2) against PEFT's scaling
(``LoraLayer.scaling`` times the multiplier) for every variant (LoRA, rsLoRA, patterns, DoRA,
lora_bias, embeddings, Conv1D, fused projections, convs) and every form the passes emit (fold,
fold in place, branch fused and GEMM, mixed batches); ``trained_adapter()`` of summed adapters."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from cases import CASE_IDS, CASES, example_ids, logits, peft_adapter, tiny_model, two_adapters_peft
from peft.tuners.lora import LoraLayer

import lora_fx
from lora_fx import LoraConfig
from lora_fx.loading import random_adapter

TOL = dict(atol=1e-4, rtol=1e-4)
SCALES = (0.5, 2.0, 0.0, 1.0)


def scaled_peft(pm: torch.nn.Module, scale: float) -> None:
    """PEFT's model with every LoRA layer's scaling set to its own times ``scale``."""
    for m in pm.modules():
        if isinstance(m, LoraLayer):
            base = m.__dict__.setdefault("_lora_fx_scaling", dict(m.scaling))
            for name in m.scaling:
                m.scaling[name] = base[name] * scale


def _mode(name: str) -> dict:
    return dict(mode="fold" if name.startswith("fold") else "branch", inplace=name == "fold in place")


@pytest.mark.parametrize("mode", ["branch", "fold", "fold in place"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_set_scale_matches_peft_scaling(tmp_path, case, mode):
    """One compiled model, the scale changed between calls: each equals PEFT with the same scaling
    (branch at a fused (7 tokens) and a GEMM (24 tokens) length). At 0, lora_fx runs the base
    model, modules_to_save and saved biases included (PEFT's scaling leaves those)."""
    base, pm = peft_adapter(case, str(tmp_path))
    eager = copy.deepcopy(base)
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path), inner="aot_eager", fuse_tokens=16, **_mode(mode))
    compiled = torch.compile(base, backend=be)
    lengths = (example_ids(), example_ids(seq=24, seed=1)) if mode == "branch" else (example_ids(),)
    with torch.no_grad():
        for scale in SCALES:
            be.set_scale(scale)
            scaled_peft(pm, scale)
            for ids in lengths:
                want = logits(eager, ids) if scale == 0 else logits(pm, ids)
                if scale not in (0.0, 1.0):
                    scaled_peft(pm, 1.0)
                    assert (want - logits(pm, ids)).abs().max() > 1e-4, "the scale changes the output"
                    scaled_peft(pm, scale)
                torch.testing.assert_close(logits(compiled, ids), want, **TOL)


@pytest.mark.parametrize("variant", ["plain", "lora_bias"])
def test_set_scale_in_mixed_batches_matches_peft_adapter_names(tmp_path, variant):
    """Mixed batches: each row equals PEFT's ``adapter_names`` row with the same scaling (the
    multiplier applied once, lora_bias included)."""
    base = tiny_model("qwen2")
    kw = dict(target_modules=["q_proj", "o_proj", "up_proj"], init_lora_weights=False, lora_bias=variant == "lora_bias")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **kw), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=3, use_rslora=True, **kw))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path))
    pm.eval()
    ads = {n: lora_fx.load_adapter(str(tmp_path / n)) for n in ("a", "b")}
    be = lora_fx.backend(ads, inner="aot_eager")
    compiled = torch.compile(base, backend=be)
    rows = ["b", None, "a"]
    be.select(rows)
    ids = example_ids(batch=3, seq=5)
    with torch.no_grad():
        for scale in SCALES:
            be.set_scale(scale)
            scaled_peft(pm, scale)
            want = pm(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
            torch.testing.assert_close(logits(compiled, ids), want, **TOL)


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_set_scale_on_conv_lora_matches_peft(tmp_path, mode):
    from test_peft_matrix import peft_case

    for dora in (False, True):
        d = tmp_path / str(dora)
        base, pm, x = peft_case("Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": dora}, str(d))
        be = lora_fx.backend(lora_fx.load_adapter(str(d)), mode=mode, inner="aot_eager")
        compiled = torch.compile(copy.deepcopy(base), backend=be)
        with torch.no_grad():
            for scale in SCALES[:2]:
                be.set_scale(scale)
                scaled_peft(pm, scale)
                torch.testing.assert_close(compiled(x), pm(x), **TOL)


def test_trained_adapter_of_summed_adapters_round_trips(tmp_path):
    """Summed adapters hold their ranks side by side in A / B: ``trained_adapter()`` gives each
    adapter its own rows (their offsets), before training (equal to the loaded ones) and after (the
    compiled model equals the reference over the trained list, and PEFT with both active)."""
    base, pm, dirs = two_adapters_peft(tmp_path)
    adapters = [lora_fx.load_adapter(d) for d in dirs]
    for p in base.parameters():
        p.requires_grad_(False)
    be = lora_fx.backend(adapters, inner="aot_eager")
    compiled = torch.compile(base, backend=be)
    ids = example_ids()
    for got, want in zip(be.trained_adapter(), adapters):
        for fqn, w in want.modules.items():
            torch.testing.assert_close(got.modules[fqn].lora_a, w.lora_a, atol=0, rtol=0)
            torch.testing.assert_close(got.modules[fqn].lora_b, w.lora_b, atol=0, rtol=0)
    opt = torch.optim.SGD(be.parameters(), lr=0.5)
    compiled(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    trained = be.trained_adapter()
    for i, a in enumerate(trained):
        a.save(str(tmp_path / f"t{i}"))
    with torch.no_grad():
        got = logits(compiled, ids)
        torch.testing.assert_close(got, lora_fx.lora_forward(tiny_model("llama"), trained, input_ids=ids).logits,
                                   **TOL)
        again = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "t0"), adapter_name="a")
        again.load_adapter(str(tmp_path / "t1"), adapter_name="b")
        again.base_model.set_adapter(["a", "b"])
        torch.testing.assert_close(got, logits(again.eval(), ids), **TOL)
        assert (got - logits(pm, ids)).abs().max() > 1e-4, "the step moved the adapters"


def test_set_scale_with_lora_bias_and_dora_in_one_model(tmp_path):
    """DoRA's norm and lora_bias both read the multiplier: explicit values, branch and fold."""
    model = tiny_model("qwen2")
    for kw in (dict(use_dora=True), dict(lora_bias=True)):
        ad = random_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], **kw), seed=2)
        for mode in ("branch", "fold"):
            torch._dynamo.reset()
            be = lora_fx.backend(ad, mode=mode, inner="aot_eager")
            compiled = torch.compile(copy.deepcopy(model), backend=be)
            ids = example_ids()
            with torch.no_grad():
                for scale in (2.0, 0.5):
                    be.set_scale(scale)
                    want = lora_fx.lora_forward(model, ad.scaled(scale), input_ids=ids).logits
                    torch.testing.assert_close(logits(compiled, ids), want, **TOL)
