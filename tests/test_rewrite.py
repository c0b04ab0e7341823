"""rewrite() on symbolic_trace, export and dynamo graphs equals lora_fx.reference (hypothesis)."""

import pytest
import torch
from cases import examples
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lora_fx
from lora_fx import GraphRewriteError, LoraConfig, RewriteConfig, testing
from lora_fx.loading import random_adapter

SETTINGS = dict(max_examples=examples(12), deadline=None, suppress_health_check=list(HealthCheck))
modes = st.sampled_from(["branch", "fold"])
fuse = st.sampled_from([0, 1024])  # branch: GEMM calls, or fused reductions (static token count <= fuse_tokens)


def feature_case(seed=0, bias=True, conv1d=True, **config):
    """A TinyNet with one attention + MLP block and an adapter with ``config``: the features every
    property test must reach, whatever hypothesis draws."""
    torch.manual_seed(seed)
    model = testing.TinyNet(12, 8, 16, 5, [dict(bias=bias, conv1d=conv1d, attention=True)]).eval()
    cfg = LoraConfig(r=config.pop("r", 3), lora_alpha=6, **config)
    ids = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(seed))
    return testing.Case(model, testing.random_adapter(model, cfg, seed=seed), ids)


FEATURES = {  # name -> case; each is an @example of every property test below
    "dora_conv1d": feature_case(target_modules=["up", "q_proj"], use_dora=True),
    "lora_bias_no_base_bias": feature_case(bias=False, conv1d=False, target_modules=["up", "down"], lora_bias=True),
    "lora_bias_base_bias": feature_case(target_modules=["up", "v_proj"], lora_bias=True),
    "embedding_patterns": feature_case(target_modules=["embed", "k_proj", "down"], rank_pattern={"k_proj": 5},
                                       alpha_pattern={"down": 2.0}, use_rslora=True),
}


def with_features(*extra):
    """Decorate a property test with one @example per feature case (and ``extra`` arguments)."""
    def wrap(test):
        for case in FEATURES.values():
            for args in extra or [()]:
                test = example(case, *args)(test)
        return test
    return wrap


def reference(case):
    with torch.no_grad():
        return lora_fx.lora_forward(case.model, case.adapter, case.ids)


def assert_matches(got, want):
    """1e-4 in fp32, with the absolute part scaled to the output's largest value: random TinyNets
    reach outputs in the thousands next to small ones, and a small element then carries its large
    neighbours' fp32 rounding in both computations (seen: 4.7e-4 on 3.5 beside 2420, while both
    sides were within 8.5e-4 of a float64 reference)."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))


@settings(**SETTINGS)
@given(testing.models_and_adapters(), modes)
@with_features(("branch",), ("fold",))
def test_symbolic_trace_graph_equals_reference(case, mode):
    with torch.no_grad():
        plain = case.model(case.ids)
    gm = torch.fx.symbolic_trace(case.model)
    report = lora_fx.rewrite(gm, RewriteConfig(case.adapter, mode=mode))
    assert set(report.modules) == set(case.adapter.modules)
    with torch.no_grad():
        assert_matches(gm(case.ids), reference(case))
        torch.testing.assert_close(case.model(case.ids), plain, atol=0, rtol=0)  # the model is untouched


@settings(**SETTINGS)
@given(testing.models_and_adapters(), modes, fuse)
@with_features(("branch", 0), ("branch", 1024), ("fold", 0))
def test_export_module_graph_equals_reference(case, mode, fuse_tokens):
    gm = torch.export.export(case.model, (case.ids,)).module()
    lora_fx.rewrite(gm, RewriteConfig(case.adapter, mode=mode, fuse_tokens=fuse_tokens))
    with torch.no_grad():
        assert_matches(gm(case.ids), reference(case))


@settings(**{**SETTINGS, "max_examples": examples(8)})
@given(testing.models_and_adapters(), modes, fuse)
def test_exported_program_carries_new_tensors(case, mode, fuse_tokens):
    ep = torch.export.export(case.model, (case.ids,))
    new = lora_fx.rewrite(ep, RewriteConfig(case.adapter, mode=mode, fuse_tokens=fuse_tokens))
    assert isinstance(new, torch.export.ExportedProgram)
    added = [s.target for s in new.graph_signature.input_specs if s.target and s.target.startswith("lora_fx.")]
    assert added and all(t in new.state_dict for t in added)
    assert set(new.lora_fx_report.modules) == set(case.adapter.modules)
    with torch.no_grad():
        assert_matches(new.module()(case.ids), reference(case))


@settings(**SETTINGS)
@given(testing.models_and_adapters(), modes, fuse)
@with_features(("branch", 0), ("branch", 1024), ("fold", 0))
def test_dynamo_graph_equals_reference(case, mode, fuse_tokens):
    torch._dynamo.reset()
    be = lora_fx.backend(case.adapter, mode=mode, inner="aot_eager", fuse_tokens=fuse_tokens)
    compiled = torch.compile(case.model, backend=be, fullgraph=True)
    with torch.no_grad():
        assert_matches(compiled(case.ids), reference(case))
    assert set(be.reports[0].modules) == set(case.adapter.modules)


@pytest.mark.inductor
@settings(**{**SETTINGS, "max_examples": examples(3)})
@given(testing.models_and_adapters(), modes, st.sampled_from([0, None]))
@example(FEATURES["dora_conv1d"], "branch", None)  # fused form under Inductor
@example(FEATURES["lora_bias_no_base_bias"], "branch", 0)  # GEMM form
@example(FEATURES["embedding_patterns"], "branch", None)
def test_dynamo_inductor_equals_reference(case, mode, fuse_tokens):
    torch._dynamo.reset()
    be = lora_fx.backend(case.adapter, mode=mode, fuse_tokens=fuse_tokens)  # None: Inductor's default, 16
    compiled = torch.compile(case.model, backend=be, fullgraph=True)
    with torch.no_grad():
        assert_matches(compiled(case.ids), reference(case))


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


class _KwLinear(torch.nn.Linear):
    def forward(self, x):
        return torch.nn.functional.linear(input=x, weight=self.weight, bias=self.bias)


class _KwEmbedding(torch.nn.Embedding):
    def forward(self, ids):
        return torch.nn.functional.embedding(input=ids, weight=self.weight)


class _KwConv(torch.nn.Conv2d):
    def forward(self, x):
        return torch.nn.functional.conv2d(x, weight=self.weight, bias=self.bias)


class _KwNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.proj, self.conv = _KwEmbedding(10, 8), _KwLinear(8, 8), _KwConv(8, 8, 1)

    def forward(self, ids):
        return self.conv(self.proj(self.emb(ids)).transpose(1, 2)[..., None])


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_operands_passed_by_keyword_are_applied(mode):
    """``F.linear(input=x, weight=w)``, ``F.embedding(input=i, weight=w)``, ``F.conv2d(x, weight=w)``:
    the ops' operands reach the graph as keywords."""
    torch.manual_seed(0)
    model = _KwNet()
    ad = random_adapter(model, LoraConfig(r=2, target_modules=["emb", "proj", "conv"]))
    ids = torch.randint(0, 10, (2, 5))
    want = lora_fx.lora_forward(model, ad, ids)
    assert (want - model(ids)).abs().max() > 1e-2
    compiled = torch.compile(model, backend=lora_fx.backend(ad, mode=mode, inner="aot_eager"))
    torch.testing.assert_close(compiled(ids), want, atol=1e-4, rtol=1e-4)
