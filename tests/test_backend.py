"""The torch.compile backend against PEFT on real architectures: logits, generate, counts, code."""

import copy
import re

import peft
import pytest
import torch
from cases import CASE_IDS, CASES, Case, example_ids, logits, peft_adapter, tiny_model
from torch._dynamo.testing import CompileCounterWithBackend

import lora_fx
from lora_fx import GraphRewriteError, LoraConfig

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.mark.inductor
@pytest.mark.parametrize("mode", ["branch", "fold"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_matches_peft(tmp_path, case, mode):
    base, pm = peft_adapter(case, str(tmp_path))
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path), mode=mode)
    compiled = torch.compile(base, backend=be, fullgraph=True)
    with torch.no_grad():
        # 14 static tokens: branch's fused form (<= fuse_tokens); 48 tokens, dynamic: its GEMM form.
        # Fold's graph has one form (the base op reading W'): one length.
        for ids in (example_ids(), example_ids(seq=24, seed=1))[: 2 if mode == "branch" else 1]:
            want = logits(pm, ids)
            with be.disabled():  # the model run uncompiled carries the adapter too (lora_fx.eager)
                assert (want - logits(base, ids)).abs().max() > 1e-3, "the adapter must change the outputs"
            torch.testing.assert_close(logits(compiled, ids), want, **TOL)
    assert len(be.reports) == (2 if mode == "branch" else 1)
    assert all(len(r.modules) == len(lora_fx.load_adapter(tmp_path).modules) for r in be.reports)


def greedy(model, ids, n=6):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.inductor
@pytest.mark.parametrize("mode", ["branch", "fold"])
@pytest.mark.parametrize("name", ["llama_all_linear_rslora", "gpt2_conv1d"])
def test_generate_matches_peft_tokens(tmp_path, name, mode):
    case = next(c for c in CASES if c.name == name)
    base, pm = peft_adapter(case, str(tmp_path))
    ids = example_ids(batch=1, seq=5)
    with torch.no_grad():
        want = greedy(pm, ids)
        assert not torch.equal(want, greedy(base, ids)), "the adapter must change the tokens"
        base.forward = torch.compile(base.forward, backend=lora_fx.backend(lora_fx.load_adapter(tmp_path), mode=mode))
        got = greedy(base, ids)
    assert torch.equal(got, want)


def run_counted(model, inner_backend, fn):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    model.forward = torch.compile(model.forward, backend=inner_backend(counter))
    with torch.no_grad():
        fn(model)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return counter.frame_count, counter.op_count > 0, breaks


@pytest.mark.parametrize("what", ["forward", "generate"])
@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_no_extra_graphs_breaks_or_recompiles(tmp_path, what, mode):
    case = next(c for c in CASES if c.name == "llama_qv")
    _, _ = peft_adapter(case, str(tmp_path))
    ad = lora_fx.load_adapter(tmp_path)
    ids = example_ids(batch=1, seq=5)

    def work(model):
        if what == "forward":
            model(input_ids=ids)
            model(input_ids=example_ids(batch=1, seq=9))  # one dynamic recompile, as the base
        else:
            greedy(model, ids)

    base_counts = run_counted(tiny_model("llama"), lambda counter: counter, work)
    ours = run_counted(tiny_model("llama"), lambda counter: lora_fx.backend(ad, mode=mode, inner=counter), work)
    assert base_counts[0] >= 1
    assert ours == base_counts


def matmul_calls(code: str) -> int:
    """GEMM calls in Inductor's code (extern kernels or ATen fallbacks; not the comments naming them)."""
    return len(re.findall(r"(?:extern_kernels\.|torch\.ops\.aten\.)(?:mm|addmm|bmm|baddbmm)(?:\.\w+)?\(", code))


@pytest.mark.inductor
@pytest.mark.parametrize("name", ["llama_all_linear_rslora", "gpt2_conv1d"])
def test_fold_code_has_the_base_models_matmuls(tmp_path, name):
    from torch._inductor.utils import run_and_get_code

    case = next(c for c in CASES if c.name == name)
    base, pm = peft_adapter(case, str(tmp_path))
    ids = example_ids()
    with torch.no_grad():
        want = logits(pm, ids)
        assert (want - logits(base, ids)).abs().max() > 0.05
        _, base_code = run_and_get_code(torch.compile(copy.deepcopy(base)), input_ids=ids)
        torch._dynamo.reset()
        be = lora_fx.backend(lora_fx.load_adapter(tmp_path), mode="fold")
        _, fold_code = run_and_get_code(torch.compile(base, backend=be), input_ids=ids)
        torch._dynamo.reset()
        be = lora_fx.backend(lora_fx.load_adapter(tmp_path), mode="branch", fuse_tokens=0)
        branch, branch_code = run_and_get_code(torch.compile(copy.deepcopy(base), backend=be), input_ids=ids)
        torch._dynamo.reset()
        be = lora_fx.backend(lora_fx.load_adapter(tmp_path), mode="branch")  # 14 static tokens <= 16: fused
        fused, fused_code = run_and_get_code(torch.compile(copy.deepcopy(base), backend=be), input_ids=ids)
    n_base = matmul_calls("\n".join(base_code))
    assert n_base > 0
    assert matmul_calls("\n".join(fold_code)) == n_base
    # one expand per module; one shrink per input the targets read: Llama's q / k / v read one
    # tensor, gate / up another; GPT-2's Conv1D modules each read their own
    reads = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    inputs = {(parent, reads.get(leaf, leaf)) for parent, leaf in (f.rsplit(".", 1) for f in be.state.layout.specs)}
    assert len(inputs) < len(be.state.layout.specs) or name == "gpt2_conv1d"
    assert matmul_calls("\n".join(branch_code)) == n_base + len(inputs) + len(be.state.layout.specs)
    assert matmul_calls("\n".join(fused_code)) == n_base  # the update lives in Inductor's own kernels
    for got in (branch, fused):  # both forms give PEFT's logits
        torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=1e-4)


def test_training_step_matches_peft(tmp_path):
    case = next(c for c in CASES if c.name == "llama_patterns")
    base, pm = peft_adapter(case, str(tmp_path))
    pm.train()
    ids = example_ids(seq=6)
    pm_loss = pm(input_ids=ids, labels=ids).loss
    pm_loss.backward()
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path), mode="branch", inner="aot_eager")
    for p in base.parameters():
        p.requires_grad_(False)
    compiled = torch.compile(base, backend=be)
    params = be.named_parameters()  # what an optimizer is built from; turns A / B gradients on
    assert params, "branch mode exposes A and B"
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, pm_loss, atol=1e-5, rtol=1e-5)
    peft_mods = dict(pm.base_model.model.named_modules())
    for fqn, tensors in params.items():
        r = peft_mods[fqn].lora_A["default"].weight.shape[0]
        torch.testing.assert_close(tensors["lora_a"].grad[:r], peft_mods[fqn].lora_A["default"].weight.grad,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tensors["lora_b"].grad[:, :r], peft_mods[fqn].lora_B["default"].weight.grad,
                                   atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in base.parameters())
    # an optimizer step is seen by the next call, without recompiling
    opt = torch.optim.SGD(be.parameters(), lr=1.0)
    opt.step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        after = compiled(input_ids=ids, labels=ids).loss
    assert abs(after.item() - loss.item()) > 1e-4


@pytest.mark.parametrize("fuse_tokens", [0, 64])
def test_embedding_lora_training_keeps_the_padding_row_as_peft(tmp_path, fuse_tokens):
    """PEFT looks LoRA's A up with the base embedding's padding_idx: no gradient reaches A's
    padding row. Phi-3's tiny config has pad_token_id 0, and the ids hold it."""
    case = Case("phi3_embedding", "phi3", dict(target_modules=["embed_tokens", "qkv_proj"]))
    base, pm = peft_adapter(case, str(tmp_path))
    assert base.get_input_embeddings().padding_idx == 0
    pm.train()
    ids = example_ids(seq=6)
    ids[:, 0] = 0
    pm_loss = pm(input_ids=ids, labels=ids).loss
    pm_loss.backward()
    peft_a = pm.base_model.model.model.embed_tokens.lora_embedding_A["default"]
    assert torch.count_nonzero(peft_a.grad[:, 0]) == 0 and torch.count_nonzero(peft_a.grad[:, 1:]) > 0
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path), mode="branch", inner="aot_eager", fuse_tokens=fuse_tokens)
    for p in base.parameters():
        p.requires_grad_(False)
    params = be.named_parameters()
    loss = torch.compile(base, backend=be)(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, pm_loss, atol=1e-5, rtol=1e-5)
    peft_mods = dict(pm.base_model.model.named_modules())
    for fqn, tensors in params.items():
        mod = peft_mods[fqn]
        want_a, want_b = ((mod.lora_embedding_A["default"].grad.T, mod.lora_embedding_B["default"].grad)
                          if fqn.endswith("embed_tokens") else
                          (mod.lora_A["default"].weight.grad, mod.lora_B["default"].weight.grad))
        torch.testing.assert_close(tensors["lora_a"].grad, want_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tensors["lora_b"].grad, want_b, atol=1e-5, rtol=1e-5)


def test_training_a_parameter_modules_to_save_replaces_is_refused_unless_frozen(tmp_path):
    """modules_to_save tensors are substituted, not trained (PEFT trains its copy): a training call
    while the replaced parameter wants a gradient is refused; frozen, A / B train as PEFT's."""
    case = next(c for c in CASES if c.name == "gpt2_bias_all_modules_to_save")
    base, pm = peft_adapter(case, str(tmp_path))
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path), mode="branch", inner="aot_eager")
    params = be.named_parameters()
    compiled = torch.compile(base, backend=be)
    ids = example_ids(seq=6)
    with pytest.raises(GraphRewriteError, match=r"transformer\.ln_f\.weight: the adapter's tensor") as e:
        compiled(input_ids=ids, labels=ids)
    assert "requires_grad_(False)" in str(e.value)
    with torch.no_grad():  # inference is not training
        torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), **TOL)
    assert "transformer.h.0.attn.c_attn.bias: the adapter's tensor" in str(e.value)  # bias="all" saves biases too
    for p in base.parameters():
        p.requires_grad_(False)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n)
    want = pm(input_ids=ids, labels=ids).loss
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    peft_mods = dict(pm.base_model.model.named_modules())
    for fqn, tensors in params.items():
        torch.testing.assert_close(tensors["lora_a"].grad, peft_mods[fqn].lora_A["default"].weight.grad,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_modules_to_save_matches_names_by_suffix_as_peft(tmp_path, mode):
    """PEFT wraps every module whose name ends with a modules_to_save entry: "norm" takes the final
    norm and every input_layernorm / post_attention_layernorm, and saves them all."""
    case = Case("llama_norm", "llama", dict(target_modules=["q_proj"], modules_to_save=["norm"]))
    base, pm = peft_adapter(case, str(tmp_path))
    ad = lora_fx.load_adapter(tmp_path)
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight"} <= set(ad.overrides)
    assert_compiled_equals_peft(base, pm, ad, mode)


def test_embedding_with_max_norm_is_refused(tmp_path):
    base = tiny_model("llama")
    base.model.embed_tokens.max_norm = 1.0
    ad = lora_fx.init_adapter(base, LoraConfig(target_modules=["embed_tokens"]))
    for mode in ("branch", "fold"):
        torch._dynamo.reset()
        compiled = torch.compile(base, backend=lora_fx.backend(ad, mode=mode, inner="eager"))
        with pytest.raises(GraphRewriteError) as e, torch.no_grad():  # as it is, not wrapped by dynamo
            compiled(input_ids=example_ids())
        assert "model.embed_tokens: embedding with max_norm=1.0" in str(e.value)


@pytest.mark.inductor
@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_bf16_model_with_fp32_adapter_matches_peft(tmp_path, mode):
    case = next(c for c in CASES if c.name == "llama_dora")
    base, _ = peft_adapter(case, str(tmp_path))
    base = base.to(torch.bfloat16)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = example_ids()
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path), mode=mode)
    compiled = torch.compile(base, backend=be)
    with torch.no_grad():
        want, got = logits(pm, ids).float(), logits(compiled, ids).float()
        with be.disabled():
            plain = logits(base, ids).float()
    assert got.dtype == torch.float32 and (want - plain).abs().max() > 0.05
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_bf16_adapter_on_fp32_model_matches_reference(tmp_path, mode):
    base, _ = peft_adapter(CASES[0], str(tmp_path))
    ad = lora_fx.load_adapter(tmp_path, dtype=torch.bfloat16)
    ids = example_ids()
    compiled = torch.compile(base, backend=lora_fx.backend(ad, mode=mode, inner="aot_eager"))
    with torch.no_grad():
        got = logits(compiled, ids)
        want = lora_fx.lora_forward(base, ad, input_ids=ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def assert_compiled_equals_peft(base, pm, ad, mode):
    """``base`` compiled with ``ad`` (aot_eager) gives PEFT's logits at 1e-4, where the adapter
    changes them."""
    ids = example_ids()
    compiled = torch.compile(base, backend=lora_fx.backend(ad, mode=mode, inner="aot_eager"))
    with torch.no_grad():
        want = logits(pm, ids)
        assert (want - logits(base, ids)).abs().max() > 0.05
        torch.testing.assert_close(logits(compiled, ids), want, **TOL)


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_half_precision_adapter_file_computes_in_fp32_as_peft(tmp_path, mode, file_dtype):
    """PEFT loads a bf16 / fp16 adapter file into fp32 LoRA weights (autocast_adapter_dtype=True,
    its default) and computes the update in fp32; so does load_adapter by default."""
    from safetensors.torch import load_file, save_file

    base, _ = peft_adapter(CASES[2], str(tmp_path))  # DoRA: its magnitude is cast too
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v.to(file_dtype) for k, v in load_file(path).items()}, path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ad = lora_fx.load_adapter(tmp_path)
    assert all(t.dtype == torch.float32 for w in ad.modules.values() for t in (w.lora_a, w.lora_b, w.magnitude))
    assert lora_fx.load_adapter(tmp_path, autocast_adapter_dtype=False).modules[
        "model.layers.0.self_attn.q_proj"].lora_a.dtype == file_dtype
    assert_compiled_equals_peft(base, pm, ad, mode)


def test_init_adapter_on_a_bf16_model_holds_fp32_as_peft():
    """get_peft_model on a bf16 model makes fp32 LoRA weights, so small updates are not rounded
    away in training; init_adapter does the same."""
    base = tiny_model("llama").to(torch.bfloat16)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    want = {n: p.dtype for n, p in pm.named_parameters() if "lora_" in n}
    ad = lora_fx.init_adapter(base, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    assert set(want.values()) == {torch.float32}
    assert {t.dtype for w in ad.modules.values() for t in (w.lora_a, w.lora_b)} == {torch.float32}
    assert lora_fx.init_adapter(base, LoraConfig(r=4, target_modules=["q_proj"]), dtype=torch.bfloat16).modules[
        "model.layers.0.self_attn.q_proj"].lora_a.dtype == torch.bfloat16


def test_dynamic_shapes(tmp_path):
    base, pm = peft_adapter(CASES[0], str(tmp_path))
    compiled = torch.compile(base, backend=lora_fx.backend(lora_fx.load_adapter(tmp_path), inner="aot_eager"),
                             dynamic=True)
    with torch.no_grad():
        for seq in (3, 8, 11):
            ids = example_ids(seq=seq)
            torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), **TOL)


def test_target_the_model_lacks_is_an_error(tmp_path):
    base = tiny_model("llama")
    ad = lora_fx.init_adapter(base, LoraConfig(target_modules=["q_proj"]))
    ad.modules["model.layers.9.self_attn.q_proj"] = ad.modules["model.layers.0.self_attn.q_proj"]
    compiled = torch.compile(base, backend=lora_fx.backend(ad, inner="eager"))
    with pytest.raises(GraphRewriteError) as e:  # as it is: dynamo would wrap it in BackendCompilerFailed
        compiled(input_ids=example_ids())
    assert not isinstance(e.value.__cause__, torch._dynamo.exc.BackendCompilerFailed)
    assert "model.layers.9.self_attn.q_proj: expected a linear" in str(e.value)


@pytest.mark.parametrize("bad", [-1, 2.5, "16"])
def test_bad_fuse_tokens_is_an_error(bad):
    ad = lora_fx.init_adapter(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=f"fuse_tokens: expected an int >= 0, found {bad!r}"):
        lora_fx.backend(ad, fuse_tokens=bad)


def test_inner_picks_the_fuse_default():
    ad = lora_fx.init_adapter(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]))
    assert lora_fx.backend(ad).fuse_tokens == 16  # Inductor fuses the reductions
    assert lora_fx.backend(ad, inner="aot_eager").fuse_tokens == 0  # elsewhere they would run as they are
    assert lora_fx.backend(ad, inner="aot_eager", fuse_tokens=4).fuse_tokens == 4


def test_dynamo_graph_is_not_mutated(tmp_path):
    base = tiny_model("llama")
    ad = lora_fx.init_adapter(base, LoraConfig(target_modules=["q_proj"]))
    seen = {}

    def spy(gm, example_inputs):
        seen["before"] = [n.format_node() for n in gm.graph.nodes]
        be = lora_fx.backend(ad, inner="eager")
        out = be(gm, example_inputs)
        seen["after"] = [n.format_node() for n in gm.graph.nodes]
        return out

    torch.compile(base, backend=spy)(input_ids=example_ids())
    assert seen["before"] == seen["after"]


class TwoReaders(torch.nn.Module):
    """q and k read one tensor h, with something between the two reads that a shrink shared by
    q and k must not be moved across (``between``)."""

    def __init__(self, between: str):
        super().__init__()
        self.between = between
        self.norm = torch.nn.LayerNorm(32)
        self.q, self.k, self.out = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        h = self.norm(x)
        if self.between == "no_grad":
            with torch.no_grad():
                q = self.q(h)
        elif self.between == "autocast":
            with torch.autocast("cpu", torch.bfloat16):
                q = self.q(h).float()
        else:
            q = self.q(h)
        if self.between == "mul_":
            h.mul_(3.0)
        elif self.between == "setitem":
            h[:, 0] = 0.0
        return self.out(q * self.k(h))


@pytest.mark.parametrize("between", ["mul_", "setitem", "no_grad", "autocast", "nothing"])
def test_sites_reading_one_input_share_a_shrink_only_where_nothing_between_changes_it(tmp_path, between):
    """Branch (GEMM form: 40 tokens, aot_eager) equals PEFT's output, and its A / B gradients
    (but after an in-place write, which PEFT cannot train through either): an in-place write to h,
    a grad-mode or autocast switch between q and k keeps k's shrink after it."""
    torch.manual_seed(0)
    base = TwoReaders(between)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q", "k"],
                                                                  init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    for p in base.parameters():
        p.requires_grad_(False)
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path), mode="branch", inner="aot_eager")
    compiled = torch.compile(copy.deepcopy(base), backend=be)
    params = be.named_parameters()
    x = torch.randn(2, 40, 32)
    inference = between in ("mul_", "setitem")  # a write to what q's A saved: no backward, in PEFT too
    with torch.set_grad_enabled(not inference):
        want, got = pm(x), compiled(x)
    assert (want - base(x)).abs().max() > 0.05
    torch.testing.assert_close(got, want, **({"atol": 2e-2, "rtol": 2e-2} if between == "autocast" else TOL))
    if inference:
        return
    want.sum().backward()
    got.sum().backward()
    for name in ("q", "k"):
        for role, peft_name in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            ref = getattr(getattr(pm.base_model.model, name), peft_name)["default"].weight.grad
            mine = params[name][role].grad
            if ref is None:  # PEFT's q under no_grad
                assert mine is None or not mine.any(), (name, role)
            else:
                assert mine is not None, (name, role)
                torch.testing.assert_close(mine, ref, **({"atol": 5e-2, "rtol": 5e-2} if between == "autocast"
                                                          else TOL))
