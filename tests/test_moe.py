"""LoRA on transformers 5 fused 3-D expert parameters (Mixtral, Qwen3-MoE), PEFT as the oracle."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import lora_fx
from lora_fx.errors import AdapterConfigError, GraphRewriteError, SwapError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
VOCAB = 64


def tiny(family: str, impl: str = "grouped_mm", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A model of ``layers`` layers with 8 experts, top-2, hidden 32, in fp32."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=8, **common))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            num_experts=8, moe_intermediate_size=48, head_dim=8, decoder_sparse_step=1, **common))
    model.set_experts_implementation(impl)
    return model.eval()


def peft_adapter(model: torch.nn.Module, tmp_path, name: str = "a", seed: int = 1, **kw):
    """(PEFT model over ``model``, the adapter's directory): q / v projections and both expert parameters."""
    torch.manual_seed(seed)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_PARAMS,
               init_lora_weights=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(**{**cfg, **kw}))
    path = tmp_path / name
    pm.save_pretrained(path)
    return pm, path


def peft_logits(pm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pm(ids).logits


def compiled_logits(model, be, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.compile(model, backend=be, dynamic=False)(ids).logits


def test_loads_each_experts_pair_as_peft_lays_it_out(tmp_path):
    model = tiny("mixtral")
    pm, path = peft_adapter(model, tmp_path, rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6},
                            use_rslora=True)
    ad = lora_fx.load_adapter(path)
    for layer in range(2):
        experts = f"model.layers.{layer}.mlp.experts"
        outer = pm.base_model.model.model.layers[layer].mlp.experts  # PEFT nests: down_proj's wrapper outside
        for name, wrapper in (("gate_up_proj", outer.base_layer), ("down_proj", outer)):
            w = ad.modules[f"{experts}.{name}"]
            assert (w.experts, w.param, w.rank) == (8, name, 2 if name == "down_proj" else 4)
            torch.testing.assert_close(w.delta_weight(), wrapper.get_delta_weight("default"), atol=1e-6, rtol=1e-5)
    ad.check(pm.unload())


def test_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    model = tiny("mixtral")
    pm, path = peft_adapter(model, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 5))
    want = peft_logits(pm, ids)
    lora_fx.load_adapter(path).save(tmp_path / "again")
    again = peft.PeftModel.from_pretrained(pm.unload(), tmp_path / "again")
    torch.testing.assert_close(peft_logits(again, ids), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("inplace", [False, True])
def test_fold_equals_peft_at_decode_and_prefill(tmp_path, family, impl, inplace):
    model = tiny(family, impl, layers=1)
    pm, path = peft_adapter(model, tmp_path)
    ids = {n: torch.randint(0, VOCAB, (2, n)) for n in (1, 9)}
    want = {n: peft_logits(pm, x) for n, x in ids.items()}
    base = pm.unload()
    be = lora_fx.backend(lora_fx.load_adapter(path), mode="fold", inner="aot_eager", inplace=inplace)
    for n, x in ids.items():
        torch.testing.assert_close(compiled_logits(base, be, x), want[n], atol=1e-4, rtol=1e-4)
    assert be.unseen_modules() == []


@pytest.mark.inductor
def test_fold_equals_peft_under_inductor(tmp_path):
    model = tiny("mixtral", "grouped_mm")
    pm, path = peft_adapter(model, tmp_path)
    ids = torch.randint(0, VOCAB, (1, 9))
    want = peft_logits(pm, ids)
    be = lora_fx.backend(lora_fx.load_adapter(path), mode="fold")
    torch.testing.assert_close(compiled_logits(pm.unload(), be, ids), want, atol=1e-4, rtol=1e-4)


def recording(graphs: list):
    """An inner compiler that keeps each rewritten graph and runs it with aot_eager."""
    def inner(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return inner


def dense_deltas(gm, experts: int = 8) -> list[str]:
    """Nodes lora_fx added whose value has an expert parameter's size or more (a dense delta)."""
    return [n.name for n in gm.graph.nodes if n.meta.get("lora_fx") and isinstance(v := n.meta.get("val"), torch.Tensor)
            and v.numel() >= experts * 32 * 48]


@pytest.mark.parametrize("family, impl", [("qwen3_moe", "batched_mm"), ("mixtral", "grouped_mm")])
def test_branch_equals_peft_at_decode_and_prefill_without_a_dense_delta(tmp_path, family, impl):
    model = tiny(family, impl, layers=1)
    pm, path = peft_adapter(model, tmp_path)
    ids = {n: torch.randint(0, VOCAB, (2, n)) for n in (1, 9)}
    want = {n: peft_logits(pm, x) for n, x in ids.items()}
    base = pm.unload()
    for n, x in ids.items():
        with torch.no_grad():
            assert (want[n] - base(x).logits).abs().max() > 1e-2, "the adapter changes the logits"
    graphs = []
    be = lora_fx.backend(lora_fx.load_adapter(path), mode="branch", inner=recording(graphs))
    for n, x in ids.items():
        torch.testing.assert_close(compiled_logits(base, be, x), want[n], atol=1e-4, rtol=1e-4)
    assert be.unseen_modules() == []
    assert "model.layers.0.mlp.experts.down_proj: branch 8 experts r=4 LoRA" in str(be.reports[0])
    assert [dense_deltas(gm) for gm in graphs] == [[] for _ in graphs], "only routed rows get the update"


@pytest.mark.inductor
def test_branch_equals_peft_under_inductor(tmp_path):
    model = tiny("qwen3_moe", "batched_mm", layers=1)
    pm, path = peft_adapter(model, tmp_path)
    ids = torch.randint(0, VOCAB, (1, 9))
    want = peft_logits(pm, ids)
    be = lora_fx.backend(lora_fx.load_adapter(path), mode="branch")
    torch.testing.assert_close(compiled_logits(pm.unload(), be, ids), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode, family, impl", [("fold", "qwen3_moe", "batched_mm"),
                                                 ("branch", "mixtral", "grouped_mm"), ("branch", "qwen3_moe", "eager")])
def test_swaps_rank_sets_scale_and_disables_without_recompiling(tmp_path, mode, family, impl):
    model = tiny(family, impl, layers=1)
    pm, path = peft_adapter(model, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 6))
    want_a = peft_logits(pm, ids)
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"],
                                        target_parameters=EXPERT_PARAMS, init_lora_weights=False))
    pm.set_adapter("b")
    want_b = peft_logits(pm, ids)
    for m in pm.modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.set_scale("b", 0.5)
    want_half = peft_logits(pm, ids)
    pm.save_pretrained(tmp_path / "both")
    base = pm.unload()
    with torch.no_grad():
        want_off = base(ids).logits
    be = lora_fx.backend(lora_fx.load_adapter(path), mode=mode, inner="aot_eager")
    f = torch.compile(base, backend=be, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(f(ids).logits, want_a, atol=1e-4, rtol=1e-4)
        graphs = len(be.reports)  # one, or one per piece between the experts loop's graph breaks
        be.swap(lora_fx.load_adapter(tmp_path / "both" / "b"))
        torch.testing.assert_close(f(ids).logits, want_b, atol=1e-4, rtol=1e-4)
        be.set_scale(0.5)
        torch.testing.assert_close(f(ids).logits, want_half, atol=1e-4, rtol=1e-4)
        with be.disabled():
            plain = f(ids).logits
    torch.testing.assert_close(plain, want_off, atol=1e-5, rtol=1e-5)
    assert (want_b - want_half).abs().max() > 1e-2 and (want_half - want_off).abs().max() > 1e-2
    assert len(be.reports) == graphs, "swap, set_scale and disable reuse the compiled graphs"
    if impl == "eager":  # the experts loop runs eagerly anyway: uncompiled, as compiled
        with torch.no_grad():
            torch.testing.assert_close(base(ids).logits, want_half, atol=1e-4, rtol=1e-4)
        return
    with pytest.raises(GraphRewriteError, match=r"experts\.\w+: ran outside the compiled graphs with the adapter on "
                                                r"\(its experts' LoRA is applied inside the compiled graphs"), \
            torch.no_grad():
        base(ids)  # eagerly, with the adapter on: refused rather than run without it


def _peft_expert_key(fqn: str, role: str) -> str:
    """PEFT's parameter name of an expert parameter's lora_A / lora_B (down_proj's wrapper is outside)."""
    module, _, name = fqn.rpartition(".")
    return f"base_model.model.{module}.{'base_layer.' if name == 'gate_up_proj' else ''}{role}.default.weight"


@pytest.mark.parametrize("family, impl", [("mixtral", "batched_mm"), ("qwen3_moe", "grouped_mm"), ("mixtral", "eager")])
def test_branch_training_step_equals_peft(tmp_path, family, impl):
    pm, path = peft_adapter(tiny(family, impl, layers=1), tmp_path)
    ids = torch.randint(0, VOCAB, (2, 7))
    pm.train()
    want = pm(ids, labels=ids).loss
    want.backward()
    want_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    want_ab = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    base = pm.unload().requires_grad_(False)
    be = lora_fx.backend(lora_fx.load_adapter(path), mode="branch", inner="aot_eager")
    be.parameters()
    loss = torch.compile(base, backend=be, dynamic=False)(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    trained = be.trained_adapter().modules
    checked = 0
    for fqn, t in be.named_parameters().items():
        if "experts" not in fqn:
            continue
        ga, gb = lora_fx.experts.peft_layout(t["lora_a"].grad, t["lora_b"].grad)  # (r * E, in), (out, r * E)
        for role, got, weight in (("lora_A", ga, trained[fqn].lora_a), ("lora_B", gb, trained[fqn].lora_b)):
            key = _peft_expert_key(fqn, role)
            assert want_grads[key].abs().max() > 1e-4, "the experts' LoRA gets a gradient"
            torch.testing.assert_close(got, want_grads[key], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(weight, want_ab[key], atol=0, rtol=0)  # read back in PEFT's layout
            checked += 1
    assert checked == 4


def test_branch_in_bf16_runs_torchs_grouped_mm_and_equals_peft_at_bf16_precision(tmp_path):
    pm, path = peft_adapter(tiny("mixtral", "grouped_mm", layers=1), tmp_path, r=8, lora_alpha=16)
    ids = torch.randint(0, VOCAB, (2, 9))
    want = peft_logits(pm, ids)  # fp32
    base = pm.unload().to(torch.bfloat16)
    with torch.no_grad():
        assert (base(ids).logits.float() - want).abs().max() > 5e-2, "the adapter changes the logits"
    graphs = []
    be = lora_fx.backend(lora_fx.load_adapter(path, dtype=torch.bfloat16), mode="branch", inner=recording(graphs))
    torch.testing.assert_close(compiled_logits(base, be, ids).float(), want, atol=1e-2, rtol=1e-2)
    ours = {n.target for gm in graphs for n in gm.graph.nodes if n.meta.get("lora_fx")}
    assert torch._grouped_mm in ours, "a bf16 update of rank 8 (16-byte rows) runs torch's grouped_mm under compile"


@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
def test_branch_on_an_exported_program_equals_peft(tmp_path, impl):
    pm, path = peft_adapter(tiny("mixtral", impl, layers=1), tmp_path)
    ids = torch.randint(0, VOCAB, (2, 5))
    want = peft_logits(pm, ids)
    ep = torch.export.export(pm.unload(), (ids,), {"use_cache": False})  # aten ops: index, bmm, transpose
    new = lora_fx.rewrite(ep, lora_fx.RewriteConfig(lora_fx.load_adapter(path), mode="branch"))
    assert "model.layers.0.mlp.experts.gate_up_proj: branch 8 experts" in str(new.lora_fx_report)
    with torch.no_grad():
        torch.testing.assert_close(new.module()(ids, use_cache=False).logits, want, atol=1e-4, rtol=1e-4)


def test_swap_to_an_adapter_for_another_expert_count_is_refused_by_name(tmp_path):
    _, path = peft_adapter(tiny("mixtral", layers=1), tmp_path)
    ad = lora_fx.load_adapter(path)
    fqn = "model.layers.0.mlp.experts.down_proj"
    w = ad.modules[fqn]
    four = dataclasses.replace(ad, modules={**ad.modules, fqn: dataclasses.replace(
        w, lora_a=w.lora_a[:4 * w.rank], lora_b=w.lora_b[:, :4 * w.rank], experts=4)})
    for mode in ("branch", "fold"):
        be = lora_fx.backend(ad, mode=mode, inner="aot_eager")
        with pytest.raises(SwapError, match=r"experts\.down_proj: expected LoRA for 8 experts .*found 4"):
            be.swap(four)


def test_mixed_batches_with_expert_lora_are_refused_by_name(tmp_path):
    _, path = peft_adapter(tiny("mixtral"), tmp_path)
    ad = lora_fx.load_adapter(path)
    with pytest.raises(AdapterConfigError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: .*mixed-adapter "
                                                 r"batch.*serve one adapter per batch"):
        lora_fx.backend({"a": ad, "b": ad}, mode="branch")


def test_branch_on_an_expert_read_it_cannot_rewrite_is_refused_by_name(tmp_path, monkeypatch):
    pm, path = peft_adapter(tiny("mixtral", "batched_mm", layers=1), tmp_path)
    base = pm.unload()
    moe = pytest.importorskip("transformers.integrations.moe")
    monkeypatch.setattr(moe, "_batched_linear", lambda x, w, bias=None, is_transposed=False:
                        torch.einsum("soi,si->so", w, x))
    be = lora_fx.backend(lora_fx.load_adapter(path), mode="branch", inner="aot_eager")
    with pytest.raises(GraphRewriteError, match=r"experts\.gate_up_proj: branch mode .* experts implementation "
                                                r"'batched_mm' the graph reads it as W\[ids\] read by \['einsum'\].*"
                                                r"use mode='fold'"):
        compiled_logits(base, be, torch.randint(0, VOCAB, (1, 4)))


@pytest.mark.parametrize("impl", ["batched_mm", "eager"])
def test_trainer_trains_expert_lora_as_peft(tmp_path, impl):
    """for_training registers each adapted expert parameter's A / B on the experts module
    (lora_fx_A_gate_up_proj ...): transformers' Trainer logs PEFT's losses and grad norms, and the
    saved adapter loads in PEFT with the trained values."""
    from tests.test_finetune import _train, assert_logs_as_peft

    pm, path = peft_adapter(tiny("mixtral", impl, layers=1), tmp_path, lora_alpha=32)  # grad norms clipped
    base = copy.deepcopy(pm.unload())
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), path, is_trainable=True)
    model = lora_fx.for_training(copy.deepcopy(base), lora_fx.load_adapter(path), inner="aot_eager")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.layers.0.mlp.experts.lora_fx_A_gate_up_proj", "model.layers.0.mlp.experts.lora_fx_B_down_proj",
            "model.layers.0.self_attn.q_proj.lora_fx_A"} <= names and len(names) == 8
    theirs = _train(pm, str(tmp_path / "peft"))
    ours = _train(model, str(tmp_path / "ours"))
    assert_logs_as_peft(ours, theirs)
    model.save_pretrained(str(tmp_path / "saved"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "saved"))
    want = peft.get_peft_model_state_dict(pm)
    torch.testing.assert_close(peft.get_peft_model_state_dict(loaded), want, atol=1e-5, rtol=1e-5)
    start = lora_fx.load_adapter(path).state_dict()
    assert all((want[k] - start[k]).abs().max() > 1e-4 for k in want if "experts" in k), "the experts' LoRA trained"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_the_eager_experts_loop_equals_peft_at_decode_and_prefill(tmp_path, family, mode):
    pm, path = peft_adapter(tiny(family, "eager"), tmp_path)
    ids = {n: torch.randint(0, VOCAB, (2, n)) for n in (1, 9)}
    want = {n: peft_logits(pm, x) for n, x in ids.items()}
    base = pm.unload()
    plain = {n: peft_logits(base, x) for n, x in ids.items()}
    be = lora_fx.backend(lora_fx.load_adapter(path), mode=mode, inner="aot_eager")
    be.check(base)
    f = torch.compile(base, backend=be)
    with torch.no_grad():
        for n, x in ids.items():
            assert (want[n] - plain[n]).abs().max() > 1e-2, "the adapter changes the logits"
            torch.testing.assert_close(f(x).logits, want[n], atol=1e-4, rtol=1e-4)
            with be.disabled():
                torch.testing.assert_close(f(x).logits, plain[n], atol=1e-5, rtol=1e-5)
    assert be.unseen_modules() == []  # reached, eagerly: the loop never reaches a compiled graph
    assert not [m for r in be.reports for m in r.modules if "experts" in m]


@pytest.mark.inductor
def test_the_eager_experts_loop_equals_peft_under_inductor(tmp_path):
    pm, path = peft_adapter(tiny("mixtral", "eager", layers=1), tmp_path)
    ids = {n: torch.randint(0, VOCAB, (1, n)) for n in (1, 9)}  # decode, prefill
    want = {n: peft_logits(pm, x) for n, x in ids.items()}
    base = pm.unload()
    for mode in ("branch", "fold"):
        be = lora_fx.backend(lora_fx.load_adapter(path), mode=mode)
        f = torch.compile(base, backend=be)
        with torch.no_grad():
            for n, x in ids.items():
                torch.testing.assert_close(f(x).logits, want[n], atol=1e-4, rtol=1e-4)
        torch._dynamo.reset()


def test_an_experts_implementation_lora_fx_has_not_verified_is_refused_by_name(tmp_path):
    pm, path = peft_adapter(tiny("mixtral", layers=1), tmp_path)
    base = pm.unload()
    base.model.layers[0].mlp.experts.config._experts_implementation_internal = "deepgemm"
    be = lora_fx.backend(lora_fx.load_adapter(path), mode="branch", inner="aot_eager")
    with pytest.raises(GraphRewriteError, match=r"experts\.gate_up_proj: MixtralExperts computes with experts "
                                                r"implementation 'deepgemm'.*set_experts_implementation"):
        be.check(base)


def test_two_backends_on_one_eager_loop_model_each_apply_their_own_adapter(tmp_path):
    pm_a, path_a = peft_adapter(tiny("mixtral", "eager", layers=1), tmp_path, "a")
    pm_b, path_b = peft_adapter(tiny("mixtral", "eager", layers=1), tmp_path, "b", seed=7)  # the same base weights
    ids = torch.randint(0, VOCAB, (2, 5))
    want_a, want_b, base = peft_logits(pm_a, ids), peft_logits(pm_b, ids), pm_a.unload()
    plain = peft_logits(base, ids)
    be_a = lora_fx.backend(lora_fx.load_adapter(path_a), mode="branch", inner="aot_eager")
    be_b = lora_fx.backend(lora_fx.load_adapter(path_b), mode="fold", inner="aot_eager")
    f_a, f_b = torch.compile(base, backend=be_a), torch.compile(base, backend=be_b)
    with torch.no_grad():
        torch.testing.assert_close(f_a(ids).logits, want_a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(f_b(ids).logits, want_b, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(f_a(ids).logits, want_a, atol=1e-4, rtol=1e-4)  # the experts follow the call
        with be_a.disabled():
            torch.testing.assert_close(f_a(ids).logits, plain, atol=1e-5, rtol=1e-5)


def test_a_guarded_eager_loop_model_pickles_as_its_own_classes(tmp_path):
    pm, path = peft_adapter(tiny("mixtral", "eager", layers=1), tmp_path)
    ids = torch.randint(0, VOCAB, (2, 5))
    base = pm.unload()
    plain = peft_logits(base, ids)
    be = lora_fx.backend(lora_fx.load_adapter(path), mode="branch", inner="aot_eager")
    with torch.no_grad():
        torch.compile(base, backend=be)(ids)
    torch.save(base, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    experts = loaded.model.layers[0].mlp.experts
    assert type(experts) is transformers.models.mixtral.modeling_mixtral.MixtralExperts
    torch.testing.assert_close(peft_logits(loaded, ids), plain, atol=1e-6, rtol=1e-6)  # no backend travels with it


def test_eager_loop_fold_of_a_bf16_adapter_on_an_fp32_base_equals_peft(tmp_path):
    pm, path = peft_adapter(tiny("mixtral", "eager", layers=1), tmp_path, lora_alpha=64)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.data = p.data.bfloat16()
    pm.save_pretrained(tmp_path / "bf16")
    base = pm.unload()
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "bf16", autocast_adapter_dtype=False)
    ids = torch.randint(0, VOCAB, (2, 9))
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path / "bf16", autocast_adapter_dtype=False), mode="fold",
                         inner="aot_eager")
    torch.testing.assert_close(compiled_logits(base, be, ids), peft_logits(ref, ids), atol=1e-4, rtol=1e-4)


def test_the_reference_math_on_a_guarded_eager_loop_model_applies_only_its_own_adapter(tmp_path):
    pm, path = peft_adapter(tiny("mixtral", "eager", layers=1), tmp_path, "full")
    base = pm.unload()
    pq, path_q = peft_adapter(copy.deepcopy(base), tmp_path, "qv", seed=3, target_parameters=None)
    ids = torch.randint(0, VOCAB, (2, 5))
    want = peft_logits(pq, ids)
    be = lora_fx.backend(lora_fx.load_adapter(path), mode="branch", inner="aot_eager")
    with torch.no_grad():
        torch.compile(base, backend=be)(ids)  # the experts are guarded now
        got = lora_fx.reference.lora_forward(base, lora_fx.load_adapter(path_q), ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_switching_to_the_eager_loop_after_compiling_is_refused_by_name(tmp_path):
    pm, path = peft_adapter(tiny("mixtral", "grouped_mm", layers=1), tmp_path)
    ids = torch.randint(0, VOCAB, (2, 5))
    want = peft_logits(pm, ids)
    base = pm.unload()
    peft_logits(base, ids)  # uncompiled first (the experts loop then runs inside frames dynamo resumes)
    be = lora_fx.backend(lora_fx.load_adapter(path), mode="branch", inner="aot_eager")
    f = torch.compile(base, backend=be)
    with torch.no_grad():
        torch.testing.assert_close(f(ids).logits, want, atol=1e-4, rtol=1e-4)
        base.set_experts_implementation("eager")
        with pytest.raises(GraphRewriteError, match=r"model\.layers\.0\.mlp\.experts\.\w+: MixtralExperts now computes "
                                                    r"with experts implementation 'eager'.*Build the backend after"):
            f(ids)
