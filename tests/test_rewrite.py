"""rewrite() on symbolic_trace, export and dynamo graphs equals lora_fx.reference (hypothesis)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_fx
from lora_fx import GraphRewriteError, LoraConfig, RewriteConfig, testing

SETTINGS = dict(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
TOL = dict(atol=1e-4, rtol=1e-4)
modes = st.sampled_from(["branch", "fold"])


def reference(case):
    with torch.no_grad():
        return lora_fx.lora_forward(case.model, case.adapter, case.ids)


@settings(**SETTINGS)
@given(testing.models_and_adapters(), modes)
def test_symbolic_trace_graph_equals_reference(case, mode):
    with torch.no_grad():
        plain = case.model(case.ids)
    gm = torch.fx.symbolic_trace(case.model)
    report = lora_fx.rewrite(gm, RewriteConfig(case.adapter, mode=mode))
    assert set(report.modules) == set(case.adapter.modules)
    with torch.no_grad():
        torch.testing.assert_close(gm(case.ids), reference(case), **TOL)
        torch.testing.assert_close(case.model(case.ids), plain, atol=0, rtol=0)  # the model is untouched


@settings(**SETTINGS)
@given(testing.models_and_adapters(), modes)
def test_export_module_graph_equals_reference(case, mode):
    gm = torch.export.export(case.model, (case.ids,)).module()
    lora_fx.rewrite(gm, RewriteConfig(case.adapter, mode=mode))
    with torch.no_grad():
        torch.testing.assert_close(gm(case.ids), reference(case), **TOL)


@settings(**{**SETTINGS, "max_examples": 8})
@given(testing.models_and_adapters(), modes)
def test_exported_program_carries_new_tensors(case, mode):
    ep = torch.export.export(case.model, (case.ids,))
    new = lora_fx.rewrite(ep, RewriteConfig(case.adapter, mode=mode))
    assert isinstance(new, torch.export.ExportedProgram)
    added = [s.target for s in new.graph_signature.input_specs if s.target and s.target.startswith("lora_fx.")]
    assert added and all(t in new.state_dict for t in added)
    assert set(new.lora_fx_report.modules) == set(case.adapter.modules)
    with torch.no_grad():
        torch.testing.assert_close(new.module()(case.ids), reference(case), **TOL)


@settings(**SETTINGS)
@given(testing.models_and_adapters(), modes)
def test_dynamo_graph_equals_reference(case, mode):
    torch._dynamo.reset()
    be = lora_fx.backend(case.adapter, mode=mode, inner="aot_eager")
    compiled = torch.compile(case.model, backend=be, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(case.ids), reference(case), **TOL)
    assert set(be.reports[0].modules) == set(case.adapter.modules)


@pytest.mark.inductor
@settings(**{**SETTINGS, "max_examples": 3})
@given(testing.models_and_adapters(), modes)
def test_dynamo_inductor_equals_reference(case, mode):
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend=lora_fx.backend(case.adapter, mode=mode), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(case.ids), reference(case), **TOL)


def small_case(seed=0, **config):
    torch.manual_seed(seed)
    model = testing.TinyNet(10, 8, 16, 5, [dict(bias=True, conv1d=True, attention=True)]).eval()
    cfg = LoraConfig(r=2, target_modules=config.pop("target_modules", ["q_proj", "up", "embed"]), **config)
    return model, testing.random_adapter(model, cfg, seed=seed), torch.randint(0, 10, (2, 3))


def test_report_names_every_module():
    model, ad, ids = small_case()
    report = lora_fx.rewrite(torch.fx.symbolic_trace(model), RewriteConfig(ad, mode="branch"))
    assert report.modules == {"embed": "branch embedding r=2 LoRA", "layers.0.attn.q_proj": "branch linear r=2 LoRA",
                              "layers.0.mlp.up": "branch conv1d r=2 LoRA"}
    assert "layers.0.mlp.up" in str(report)


def test_rewriting_twice_is_an_error():
    model, ad, _ = small_case()
    gm = torch.fx.symbolic_trace(model)
    lora_fx.rewrite(gm, RewriteConfig(ad))
    with pytest.raises(GraphRewriteError, match="already rewrote"):
        lora_fx.rewrite(gm, RewriteConfig(ad))


def test_module_missing_from_graph_is_an_error():
    model, ad, _ = small_case()
    ad.modules["layers.7.attn.q_proj"] = ad.modules["layers.0.attn.q_proj"]
    with pytest.raises(GraphRewriteError, match="layers.7.attn.q_proj: expected a linear"):
        lora_fx.rewrite(torch.fx.symbolic_trace(model), RewriteConfig(ad))


def test_graph_without_module_metadata_is_an_error():
    model, ad, _ = small_case(target_modules=["q_proj"])
    gm = torch.fx.symbolic_trace(model)
    lora_fx.graph.inline_leaf_modules(gm)
    for node in gm.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    for node in gm.graph.find_nodes(op="get_attr"):  # hide parameter paths too
        node.target = node.target.replace("q_proj", "qq")
        gm.register_parameter(node.target.replace(".", "_"), None)
    with pytest.raises(GraphRewriteError, match="no module metadata"):
        lora_fx.rewrite(gm, RewriteConfig(ad))


def test_shape_mismatch_is_an_error():
    model, ad, _ = small_case(target_modules=["q_proj"])
    w = ad.modules["layers.0.attn.q_proj"]
    w.lora_a = torch.zeros(2, 5)
    with pytest.raises(GraphRewriteError, match=r"layers.0.attn.q_proj: expected weight shape \(8, 5\)"):
        lora_fx.rewrite(torch.fx.symbolic_trace(model), RewriteConfig(ad))


def test_bad_mode():
    model, ad, _ = small_case()
    with pytest.raises(ValueError, match="mode"):
        RewriteConfig(ad, mode="merge")
