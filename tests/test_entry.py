"""Where users arrive from: a PeftModel in hand (``from_peft``), and a model that PEFT still adapts
met by a lora_fx backend (never a silent no-op). PEFT is the oracle. (transformers 5.24's
``model.load_adapter`` needs PEFT >= 0.22; with the PEFT pinned here it cannot run.)"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from cases import example_ids, logits, perturb, tiny_model

import lora_fx

TOL = dict(atol=1e-4, rtol=1e-4)


def two_adapter_peft_model():
    """A PeftModel with adapters "a" (LoRA on q / v) and "b" (DoRA on q / v / down_proj), "a" active."""
    base = tiny_model("llama")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"],
                                        use_dora=True, init_lora_weights=False))
    perturb(pm, 3)
    pm.set_adapter("a")
    return pm.eval()


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_from_peft_gives_the_base_model_and_every_adapter(mode):
    pm = two_adapter_peft_model()
    ids = example_ids()
    with torch.no_grad():
        want_a = logits(pm, ids)
        pm.set_adapter("b")
        want_b = logits(pm, ids)
        pm.set_adapter("a")
    base_weights = {n.replace(".base_layer", ""): p.detach().clone()
                    for n, p in pm.get_base_model().named_parameters() if "lora_" not in n}
    model, adapters = lora_fx.from_peft(pm)
    assert sorted(adapters) == ["a", "b"] and adapters.active == ["a"]
    assert adapters["b"].is_dora and not adapters["a"].is_dora
    assert lora_fx.peft_model.peft_layers(model) == []
    now = dict(model.named_parameters())
    assert now.keys() == base_weights.keys()
    assert all(torch.equal(now[n], w) for n, w in base_weights.items()), "unloaded, not merged"
    be = lora_fx.backend(adapters["a"], mode=mode, inner="aot_eager", reserve=[adapters["b"]])
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        assert (want_a - want_b).abs().max() > 1e-2
        with be.disabled():
            assert (want_a - logits(model, ids)).abs().max() > 1e-2
        torch.testing.assert_close(logits(compiled, ids), want_a, **TOL)
        with torch._dynamo.config.patch(error_on_recompile=True):
            be.swap(adapters["b"])  # PEFT's set_adapter("b")
            torch.testing.assert_close(logits(compiled, ids), want_b, **TOL)


def test_from_peft_takes_the_scale_peft_runs_at():
    pm = two_adapter_peft_model()
    for m in pm.modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.scale_layer(0.5)
    ids = example_ids()
    with torch.no_grad():
        want = logits(pm, ids)
    model, adapters = lora_fx.from_peft(pm)
    assert adapters["a"].multiplier == pytest.approx(0.5)
    with torch.no_grad():
        got = logits(torch.compile(model, backend=lora_fx.backend(adapters["a"], inner="aot_eager")), ids)
    torch.testing.assert_close(got, want, **TOL)


def test_a_backend_meeting_a_model_peft_still_adapts_is_an_error():
    """Compiling the PeftModel itself (or its base model, PEFT's layers still in) with a lora_fx
    backend: an error that says what to do, not a report of 0 ops and PEFT's output."""
    pm = two_adapter_peft_model()
    other = lora_fx.init_adapter(tiny_model("llama"), lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
    for target in (pm, pm.get_base_model()):
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(target), backend=lora_fx.backend(other, inner="aot_eager"))
        with torch.no_grad(), pytest.raises(lora_fx.GraphRewriteError, match=r"PEFT still adapts(.|\n)*from_peft"):
            logits(compiled, example_ids())



def peft_adapter(model: torch.nn.Module) -> lora_fx.Adapter:
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    return lora_fx.from_peft(pm)[1]["default"]


def test_check_lists_every_problem_before_compiling():
    """``be.check(model)`` (and ``attach``) raise the adapter's problems with the model as a
    LoraFxError of its own, before any compile: every module with a wrong shape, every module the
    model lacks."""
    import dataclasses

    model = tiny_model("llama")
    good = peft_adapter(model)
    wrong = copy.copy(good)
    wrong.modules = dict(good.modules)
    bad = sorted(wrong.modules)[:2]
    for fqn in bad:
        w = wrong.modules[fqn]
        wrong.modules[fqn] = dataclasses.replace(w, lora_a=torch.zeros(w.lora_a.shape[0], w.lora_a.shape[1] + 1))
    be = lora_fx.backend(wrong, inner="aot_eager")
    with pytest.raises(lora_fx.ModelMismatchError, match="(?s)" + ".*".join(bad)):
        be.check(model)
    with pytest.raises(lora_fx.ModelMismatchError):
        be.attach(model)
    lora_fx.backend(good, inner="aot_eager").check(model)
    with pytest.raises(lora_fx.GraphRewriteError, match="layers.1.self_attn.q_proj.*no module of that name"):
        lora_fx.backend(good, inner="aot_eager").check(tiny_model("llama", layers=1))


def test_a_model_without_any_targeted_module_is_named_at_the_first_call():
    """An adapter whose module names the compiled model lacks entirely (another prefix) is an
    error naming them, not a graph that silently rewrites nothing."""
    model = tiny_model("llama")
    adapter = copy.copy(peft_adapter(model))
    adapter.modules = {f"base_model.model.{k}": v for k, v in adapter.modules.items()}
    compiled = torch.compile(model, backend=lora_fx.backend(adapter, inner="aot_eager"))
    with pytest.raises(lora_fx.GraphRewriteError, match="base_model.model.model.layers.0.self_attn.q_proj"):
        compiled(example_ids())


def test_dynamic_shapes_compile_once_and_equal_peft():
    """``torch.compile(model, backend=be, dynamic=True)``, the serving setting: no restart of dynamo's
    analysis goes another way (the eager guard's hooks exist before any trace), outputs equal PEFT's
    for two batch sizes, and the second size compiles nothing."""
    model = tiny_model("llama")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False)).eval()
    be = lora_fx.backend(lora_fx.from_peft(copy.deepcopy(pm))[1]["default"], inner="aot_eager")
    compiled = torch.compile(model, backend=be, dynamic=True)
    counts = []
    with torch.no_grad():
        for batch in (4, 3):
            ids = example_ids(batch=batch, seq=6)
            torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), **TOL)
            counts.append(len(be.reports))
    assert counts[0] == counts[1] > 0
