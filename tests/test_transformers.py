"""transformers' own compile route, ``generate(compile_config=CompileConfig(backend=be))``, against
PEFT; what transformers does with a config holding a backend (deep-copies it, never pickles it);
Inductor options given to the backend (``options=``) and through torch.compile."""

from __future__ import annotations

import copy
import json
import pickle

import peft
import pytest
import torch
from cases import example_ids, tiny_model
from torch._dynamo import lookup_backend
from transformers import CompileConfig, GenerationConfig

import lora_fx
from lora_fx.init import random_adapter

TOL = dict(atol=1e-4, rtol=1e-4)
GREEDY = dict(max_new_tokens=6, do_sample=False, cache_implementation="static", output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)


def peft_llama() -> peft.PeftModel:
    base = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return peft.get_peft_model(base, config).eval()


def compile_config(be: lora_fx.LoraBackend) -> CompileConfig:
    config = CompileConfig(backend=be, fullgraph=True)
    # transformers compiles generate's decode steps only on cuda / xpu / neuron / tpu, unless the config
    # sets its own switch for other devices (GenerationMixin._valid_auto_compile_criteria): these run on CPU.
    config._compile_all_devices = True
    return config


def counted_aot_eager(calls: list[int]):
    """aot_eager, counting the calls of the graphs it compiles."""
    def inner(gm, example_inputs):
        compiled = lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):
            calls.append(1)
            return compiled(*args)
        return run
    return inner


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_generate_with_compile_config_matches_peft(tmp_path, mode):
    pm = peft_llama()
    ids = example_ids()
    with torch.no_grad():
        want = pm.generate(ids, **GREEDY)
    model, adapters = lora_fx.from_peft(pm)
    with torch.no_grad():
        base = model.generate(ids, **GREEDY)
    assert (base.logits[0] - want.logits[0]).abs().max() > 1e-2, "the adapter must change the outputs"
    calls = []
    be = lora_fx.backend(adapters["default"], mode=mode, inner=counted_aot_eager(calls))
    # CompileConfig's mode defaults to "reduce-overhead": Inductor options, which aot_eager ignores
    with torch.no_grad(), pytest.warns(UserWarning, match="reduce-overhead.*ignores"):
        got = model.generate(ids, compile_config=compile_config(be), **GREEDY)
    assert len(be.reports) == 1 and len(calls) == GREEDY["max_new_tokens"] - 1, "each decode step ran compiled"
    assert torch.equal(got.sequences, want.sequences)
    # transformers runs the prefill uncompiled (lora_fx.eager gives it the adapter): its logits, then the decode's
    torch.testing.assert_close(got.logits[0], want.logits[0], **TOL)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), **TOL)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        again = model.generate(ids, compile_config=compile_config(be), **GREEDY)
    assert torch.equal(again.sequences, want.sequences)
    model.save_pretrained(tmp_path)  # a compile_config given to generate stays out of the model's config
    assert "compile_config" not in json.loads((tmp_path / "generation_config.json").read_text())


def test_a_backend_is_deep_copied_as_itself_and_never_pickled():
    model = tiny_model("llama")
    be = lora_fx.backend(random_adapter(model, lora_fx.LoraConfig(r=2, target_modules=["q_proj"])), inner="aot_eager")
    assert copy.deepcopy(be) is be and copy.copy(be) is be
    config = GenerationConfig(compile_config=CompileConfig(backend=be), max_new_tokens=3)
    assert copy.deepcopy(config).compile_config.backend is be
    assert config.to_dict()["compile_config"].backend is be
    assert config.compile_config.to_dict()["backend"] is be  # what transformers hands torch.compile
    for obj in (be, config.compile_config, config):
        with pytest.raises(lora_fx.UnpicklableError, match="passed by reference") as e:
            pickle.dumps(obj)
        assert isinstance(e.value, TypeError)


def test_a_compile_config_on_the_models_generation_config_applies_the_adapter():
    pm = peft_llama()
    ids = example_ids(batch=1)
    kw = {k: v for k, v in GREEDY.items() if k not in ("output_logits", "return_dict_in_generate")}
    with torch.no_grad():
        want = pm.generate(ids, **kw)
    model, adapters = lora_fx.from_peft(pm)
    be = lora_fx.backend(adapters["default"], mode="fold", inner="aot_eager")
    model.generation_config.compile_config = compile_config(be)
    model.generation_config.compile_config.mode = "default"  # no Inductor options: no warning
    with torch.no_grad():
        got = model.generate(ids, **kw)
    assert be.reports
    assert torch.equal(got, want)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def tiny_and_adapter():
    model = Tiny().eval()
    return model, random_adapter(model, lora_fx.LoraConfig(r=2, target_modules=["proj", "out"]))


def seen_by_inductor(seen: list, name: str):
    """An Inductor post-grad pass recording that it ran, and Inductor's cudagraphs setting then."""
    def record(graph: torch.fx.Graph) -> None:
        seen.append((name, torch._inductor.config.triton.cudagraphs))
    return record


@pytest.mark.inductor
def test_options_reach_the_inner_inductor_compile():
    model, ad = tiny_and_adapter()
    seen = []
    be = lora_fx.backend(ad, mode="branch", options={"post_grad_custom_post_pass": seen_by_inductor(seen, "backend")})
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=be)(x), lora_fx.lora_forward(model, ad, x), **TOL)
    assert seen == [("backend", False)]


@pytest.mark.inductor
def test_torch_compiles_mode_and_options_reach_inductor_under_the_backends_own():
    model, ad = tiny_and_adapter()
    x = torch.randn(3, 8)
    want = lora_fx.lora_forward(model, ad, x)
    seen = []
    own = {"post_grad_custom_post_pass": seen_by_inductor(seen, "backend")}
    # mode="reduce-overhead" is {"triton.cudagraphs": True} (no effect on a CPU graph)
    given = {"post_grad_custom_post_pass": seen_by_inductor(seen, "torch.compile")}
    runs = [(lora_fx.backend(ad, options=own), dict(mode="reduce-overhead"), ("backend", True)),
            (lora_fx.backend(ad), dict(options=given), ("torch.compile", False)),
            (lora_fx.backend(ad, options=own), dict(options=given), ("backend", False))]
    for be, kw, expected in runs:
        torch._dynamo.reset()
        seen.clear()
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(model, backend=be, **kw)(x), want, **TOL)
        assert seen == [expected], kw


def test_options_with_another_inner_compiler_are_refused():
    _, ad = tiny_and_adapter()
    with pytest.raises(ValueError, match="need inner='inductor', found inner='aot_eager'"):
        lora_fx.backend(ad, inner="aot_eager", options={"max_autotune": True})


def test_unknown_inductor_options_are_refused_all_at_once():
    _, ad = tiny_and_adapter()
    with pytest.raises(ValueError, match=r"unknown \['no_such_option', 'triton.nope'\]"):
        lora_fx.backend(ad, options={"no_such_option": 1, "max_autotune": True, "triton.nope": 2})
    with pytest.raises(ValueError, match="Unexpected type of attr max_autotune"):
        lora_fx.backend(ad, options={"max_autotune": "yes"})


def test_unknown_torch_compile_options_are_refused_at_compile():
    model, ad = tiny_and_adapter()
    compiled = torch.compile(model, backend=lora_fx.backend(ad), options={"no_such_option": 1})
    with pytest.raises(Exception, match=r"torch.compile's mode / options: .*unknown \['no_such_option'\]"):
        compiled(torch.randn(3, 8))
