"""LoRA over a quantized base (QLoRA): bitsandbytes 4-bit / 8-bit and torchao weights, branch mode.

PEFT is the oracle where it supports the format (bitsandbytes NF4 / FP4 / int8, torchao int8); the other
torchao formats are compared with the eager reference (the quantized module's own output plus the
LoRA update). Fold over a quantized weight is refused."""

import os

import peft
import pytest
import torch
from cases import VOCAB, example_ids, logits

import lora_fx
from lora_fx import GraphRewriteError, LoraConfig
from lora_fx.loading import random_adapter
from lora_fx.quantized import module_format

bnb = pytest.importorskip("bitsandbytes")
torchao = pytest.importorskip("torchao")

TOL = dict(atol=1e-4, rtol=1e-4)
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
DECODE, PREFILL = dict(batch=1, seq=5), dict(batch=2, seq=24)  # <= fuse_tokens (fused form), > (GEMM form)


def dense_llama(hidden: int = 64, seed: int = 0) -> torch.nn.Module:
    """A tiny Llama wide enough for bitsandbytes' 64-element blocks (and torchao NF4 at 128)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    dense_llama().save_pretrained(d)
    return str(d)


def bnb_llama(dense_dir: str, quant_type: str = "nf4") -> torch.nn.Module:
    """The dense model loaded 4-bit by transformers, as users load QLoRA bases (fp32 compute, CPU)."""
    import transformers as tf

    qc = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32)
    return tf.AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=qc, device_map="cpu",
                                                   dtype=torch.float32).eval()


def bnb_int8_llama(dense_dir: str) -> torch.nn.Module:
    """The dense model loaded 8-bit by transformers (LLM.int8(), outlier threshold 6.0 as default)."""
    import transformers as tf

    qc = tf.BitsAndBytesConfig(load_in_8bit=True)
    return tf.AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=qc, device_map="cpu",
                                                   dtype=torch.float32).eval()


def torchao_llama(fmt: str) -> torch.nn.Module:
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )

    model = dense_llama(hidden=128 if fmt in ("nf4", "int4_cpu") else 64)
    if fmt == "int4_cpu":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        model, cfg = model.to(torch.bfloat16), PrototypeInt4WeightOnlyConfig(group_size=32)
    elif fmt == "nf4":
        from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig

        cfg = NF4WeightOnlyConfig()
    else:
        cfg = {"int8": Int8WeightOnlyConfig, "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
               "float8": Float8WeightOnlyConfig}.get(fmt, lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4))()
    # NF4 needs a multiple of 64 * 256 elements per weight: k_proj / v_proj stay dense there
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head"
              and (fmt != "nf4" or m.weight.numel() % 16384 == 0))
    return model


def peft_trained(model: torch.nn.Module, directory: str, steps: int = 3, **kw) -> torch.nn.Module:
    """A PEFT LoRA adapter trained for ``steps`` SGD steps on ``model`` (QLoRA), saved to ``directory``."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw))
    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1.0)
    ids = example_ids(seq=12, seed=3)
    for _ in range(steps):
        opt.zero_grad()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(directory)
    return pm


def assert_matches(compiled, want_model, shapes=(DECODE, PREFILL), base=None, be=None):
    with torch.no_grad():
        for shape in shapes:
            ids = example_ids(**shape)
            want = logits(want_model, ids)
            if base is not None:  # run uncompiled, the model carries the adapter too (lora_fx.eager)
                with be.disabled():
                    assert (want - logits(base, ids)).abs().max() > 1e-3, "the adapter changes the output"
            torch.testing.assert_close(logits(compiled, ids), want, **TOL)


@pytest.mark.inductor
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_4bit_adapter_trained_with_peft_matches_peft(tmp_path, dense_dir, quant_type):
    pm = peft_trained(bnb_llama(dense_dir, quant_type), str(tmp_path))
    model = bnb_llama(dense_dir, quant_type)
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path), inner="inductor" if quant_type == "nf4" else "aot_eager")
    compiled = torch.compile(model, backend=be)
    assert_matches(compiled, pm, base=model, be=be)
    assert be.unseen_modules() == []
    fmt = module_format(model.model.layers[0].self_attn.q_proj)
    assert fmt == f"bitsandbytes {quant_type} (Params4bit)"
    assert all(fmt in what for what in be.reports[0].modules.values())


@pytest.mark.inductor
def test_torchao_int8_adapter_trained_with_peft_matches_peft(tmp_path):
    pm = peft_trained(torchao_llama("int8"), str(tmp_path))
    model = torchao_llama("int8")
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path))
    assert_matches(torch.compile(model, backend=be), pm, base=model, be=be)


@pytest.mark.inductor
def test_bnb_int8_adapter_trained_with_peft_matches_peft(tmp_path, dense_dir):
    """Linear8bitLt splits outliers with an op whose output shape depends on the data: dynamo
    compiles it whole once told to capture such ops."""
    pm = peft_trained(bnb_int8_llama(dense_dir), str(tmp_path))
    model = bnb_int8_llama(dense_dir)
    assert module_format(model.model.layers[0].self_attn.q_proj) == "bitsandbytes int8 (Int8Params)"
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path))
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        assert_matches(torch.compile(model, backend=be), pm, base=model, be=be)
    assert be.unseen_modules() == []


@pytest.mark.parametrize("target", ["q_proj", "v_proj"])
def test_a_graph_break_inside_a_targeted_module_is_refused(dense_dir, target):
    """Without capture_dynamic_output_shape_ops, dynamo breaks the graph inside every
    Linear8bitLt: the op computing its output runs between graphs. lora_fx sees the module's
    weight read by a graph that lacks its op and raises, naming it and the fix, instead of
    passing the base model's output on: when compiling that graph (q_proj, the first
    Linear8bitLt to run) or when dynamo reuses the graph compiled for q_proj for a targeted
    v_proj (same code, another module's weights)."""
    model = bnb_int8_llama(dense_dir)
    ad = random_adapter(model, LoraConfig(r=4, target_modules=[target]))
    compiled = torch.compile(model, backend=lora_fx.backend(ad, inner="aot_eager"))
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False), \
            pytest.raises(Exception, match=rf"model.layers.0.self_attn.{target}: expected its op in the graph that "
                                           r"reads its weight .*capture_dynamic_output_shape_ops = True") as e:
        compiled(input_ids=example_ids())
    assert isinstance(e.value, GraphRewriteError) and len(e.value.problems) == 1


@pytest.mark.parametrize("fmt", ["int8", "int8_dynamic", "float8", "intx_int4", "nf4", "int4_cpu"])
def test_torchao_formats_equal_the_eager_reference(fmt):
    model = torchao_llama(fmt)
    q = model.model.layers[0].self_attn.q_proj
    assert module_format(q) is not None, "the weight is quantized"
    ad = random_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    be = lora_fx.backend(ad, inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    # int4_cpu runs in bf16: the reference and the graph round the update's sum differently
    tol = dict(atol=3e-2, rtol=3e-2) if fmt == "int4_cpu" else TOL
    with torch.no_grad():
        for shape in (DECODE, PREFILL):
            ids = example_ids(**shape)
            want = lora_fx.lora_forward(model, ad, input_ids=ids).logits
            with be.disabled():
                assert (want - logits(model, ids)).abs().max() > 5e-2
            torch.testing.assert_close(logits(compiled, ids), want, **tol)


@pytest.mark.parametrize("base", ["bnb_nf4", "bnb_int8", "torchao_int8"])
def test_fold_over_a_quantized_weight_is_refused(dense_dir, base):
    model = {"bnb_nf4": bnb_llama, "bnb_int8": bnb_int8_llama}[base](dense_dir) if base != "torchao_int8" \
        else torchao_llama("int8")
    ad = random_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]))
    compiled = torch.compile(model, backend=lora_fx.backend(ad, mode="fold", inner="aot_eager"))
    fmt = {"bnb_nf4": "bitsandbytes nf4", "bnb_int8": "bitsandbytes int8", "torchao_int8": "torchao Int8Tensor"}[base]
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), \
            pytest.raises(Exception, match=rf"model.layers.0.self_attn.q_proj: fold mode .* {fmt}.*mode='branch'") as e:
        compiled(input_ids=example_ids())
    assert isinstance(e.value, GraphRewriteError)


def torchao_int8_from_pretrained(dense_dir: str) -> torch.nn.Module:
    """The dense model loaded int8 weight-only by transformers' TorchAoConfig (PEFT can merge into it)."""
    import transformers as tf
    from torchao.quantization import Int8WeightOnlyConfig

    qc = tf.TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    return tf.AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=qc, device_map="cpu").eval()


def peft_merged_logits(model: torch.nn.Module, adapter_dir: str, shapes=(DECODE, PREFILL)) -> list[torch.Tensor]:
    """PEFT's logits with ``adapter_dir`` merged into ``model`` (dequantize, add, requantize)."""
    pm = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    pm.merge_adapter()
    with torch.no_grad():
        return [logits(pm, example_ids(**shape)) for shape in shapes]


@pytest.mark.inductor
def test_fold_with_requantize_matches_peft_merge(tmp_path, dense_dir):
    """Opt-in fold over torchao int8: W' = quantize(dequantize(W) + scale * B A) with the model's
    own config, PEFT's merge of a torchao weight; off, the model's own W (not W rounded again)."""
    from torchao.quantization import Int8WeightOnlyConfig

    peft_trained(torchao_int8_from_pretrained(dense_dir), str(tmp_path))
    want = peft_merged_logits(torchao_int8_from_pretrained(dense_dir), str(tmp_path))
    model = torchao_int8_from_pretrained(dense_dir)
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path), mode="fold", requantize=Int8WeightOnlyConfig())
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        for shape, w in zip((DECODE, PREFILL), want):
            ids = example_ids(**shape)
            with be.disabled():
                base = logits(model, ids)
            assert (w - base).abs().max() > 1e-2, "the adapter changes the output"
            torch.testing.assert_close(logits(compiled, ids), w, **TOL)
            with be.disabled():
                torch.testing.assert_close(logits(compiled, ids), base, **TOL)
    assert type(be.state.derived[next(iter(be.state.derived))].tensors["weight"]).__name__ == "Int8Tensor"


def test_fold_with_requantize_swaps_and_follows_an_edited_weight(tmp_path, dense_dir):
    """A swap folds the new adapter (PEFT's merge of it); a weight replaced in the model after
    compiling is folded from (PEFT's merge over the same replaced weight)."""
    from torchao.quantization import Int8WeightOnlyConfig

    dirs = [str(tmp_path / name) for name in ("a", "b")]
    for i, d in enumerate(dirs):
        torch.manual_seed(i)
        peft.get_peft_model(torchao_int8_from_pretrained(dense_dir), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)).save_pretrained(d)
    model = torchao_int8_from_pretrained(dense_dir)
    be = lora_fx.backend(lora_fx.load_adapter(dirs[0]), mode="fold", requantize=Int8WeightOnlyConfig(),
                         inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    ids = example_ids(**PREFILL)
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled, ids), peft_merged_logits(
            torchao_int8_from_pretrained(dense_dir), dirs[0], [PREFILL])[0], **TOL)
        be.swap(lora_fx.load_adapter(dirs[1]))
        torch.testing.assert_close(logits(compiled, ids), peft_merged_logits(
            torchao_int8_from_pretrained(dense_dir), dirs[1], [PREFILL])[0], **TOL)

    def edit(m):  # o_proj's weight replaced by another int8 weight, as a fine-tuning step or a load would
        from lora_fx.quantized import requantized

        o = m.model.layers[1].self_attn.o_proj
        o.weight = requantized(o.weight.dequantize() * 0.5, Int8WeightOnlyConfig())

    edit(model)
    reference = torchao_int8_from_pretrained(dense_dir)
    edit(reference)
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled, ids), peft_merged_logits(reference, dirs[1], [PREFILL])[0], **TOL)


def test_requantize_is_refused_where_it_does_not_apply(dense_dir):
    from torchao.quantization import Int8WeightOnlyConfig

    with pytest.raises(ValueError, match="requantize: expected mode='fold' without inplace"):
        lora_fx.backend(random_adapter(dense_llama(), LoraConfig(r=4, target_modules=["q_proj"])), mode="fold",
                        inplace=True, requantize=Int8WeightOnlyConfig())
    model = bnb_llama(dense_dir)  # bitsandbytes weights: no requantizing path
    ad = random_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]))
    compiled = torch.compile(model, backend=lora_fx.backend(ad, mode="fold", inner="aot_eager",
                                                            requantize=Int8WeightOnlyConfig()))
    with pytest.raises(Exception, match=r"q_proj: fold mode .* bitsandbytes nf4.*mode='branch'") as e:
        compiled(input_ids=example_ids())
    assert isinstance(e.value, GraphRewriteError)


def test_dora_over_a_quantized_weight_is_refused(dense_dir):
    model = bnb_llama(dense_dir)
    with pytest.raises(lora_fx.AdapterConfigError, match="q_proj: DoRA over a quantized weight .*nf4"):
        lora_fx.init_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))


def test_init_adapter_takes_shapes_from_the_quantized_module(dense_dir):
    model = bnb_llama(dense_dir)
    ad = lora_fx.init_adapter(model, LoraConfig(r=4, target_modules=["v_proj", "down_proj"]), seed=0)
    v, down = ad.modules["model.layers.0.self_attn.v_proj"], ad.modules["model.layers.0.mlp.down_proj"]
    assert v.lora_a.shape == (4, 64) and v.lora_b.shape == (32, 4)  # GQA: v_proj 64 -> 32
    assert down.lora_a.shape == (4, 128) and down.lora_b.shape == (64, 4)
    assert v.lora_a.dtype == torch.float32 and v.lora_a.abs().max() > 0.5 / 64**0.5
    ad.check(model)


@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_qlora_training_step_matches_peft(tmp_path, dense_dir, base):
    """Gradients reach A and B through the frozen 4-bit (8-bit) base in the compiled graph, as in PEFT."""
    load = bnb_llama if base == "nf4" else bnb_int8_llama
    pm = peft.get_peft_model(load(dense_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                              init_lora_weights=False))
    pm.save_pretrained(str(tmp_path))
    pm.train()
    ids = example_ids(seq=6)
    want = pm(input_ids=ids, labels=ids).loss
    want.backward()
    model = load(dense_dir).train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()  # as PEFT's prepare_model_for_kbit_training: see the next test
    be = lora_fx.backend(lora_fx.load_adapter(tmp_path), inner="aot_eager")
    params = be.named_parameters()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):  # Linear8bitLt compiles whole
        loss = torch.compile(model, backend=be)(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, want, **TOL)
    peft_mods = dict(pm.base_model.model.named_modules())
    for fqn, t in params.items():
        torch.testing.assert_close(t["lora_a"].grad, peft_mods[fqn].lora_A["default"].weight.grad, **TOL)
        torch.testing.assert_close(t["lora_b"].grad, peft_mods[fqn].lora_B["default"].weight.grad, **TOL)
    quantized = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert quantized and all(isinstance(m.weight, (bnb.nn.Params4bit, bnb.nn.Int8Params)) for m in quantized)


def test_swap_scale_disable_and_mixed_batches_over_nf4(dense_dir):
    model = bnb_llama(dense_dir)
    first = random_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), seed=1)
    subset = random_adapter(model, LoraConfig(r=2, lora_alpha=8, target_modules=["v_proj"]), seed=2)
    ids = example_ids(batch=2, seq=6)
    ref = lambda ad: lora_fx.lora_forward(model, ad, input_ids=ids).logits  # noqa: E731
    be = lora_fx.backend(first, inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        model(input_ids=ids)  # bitsandbytes repacks its CPU weights at the first inference call (a new shape)
        torch.testing.assert_close(logits(compiled, ids), ref(first), **TOL)
        with torch._dynamo.config.patch(error_on_recompile=True):
            be.swap(subset)
            torch.testing.assert_close(logits(compiled, ids), ref(subset), **TOL)
            be.set_scale(0.5)
            torch.testing.assert_close(logits(compiled, ids), ref(subset.scaled(0.5)), **TOL)
            with be.disabled():
                torch.testing.assert_close(logits(compiled, ids), logits(model, ids), **TOL)
        torch._dynamo.reset()
        mixed = lora_fx.backend({"a": first, "b": subset}, inner="aot_eager")
        compiled = torch.compile(model, backend=mixed)
        mixed.select(["b", None, "a"])
        rows = example_ids(batch=3, seq=6)
        got = logits(compiled, rows)
        for i, ad in enumerate([subset, None, first]):
            with mixed.disabled():
                base = logits(model, rows[i:i + 1])
            want = base if ad is None else lora_fx.lora_forward(model, ad, input_ids=rows[i:i + 1]).logits
            torch.testing.assert_close(got[i:i + 1], want, **TOL)


def test_the_base_stays_quantized(dense_dir):
    """No dequantized copy: lora_fx holds the adapter's tensors and a few coefficients only."""
    model = bnb_llama(dense_dir)
    ad = random_adapter(model, LoraConfig(r=4, target_modules=TARGETS))
    be = lora_fx.backend(ad, inner="aot_eager")
    with torch.no_grad():
        torch.compile(model, backend=be)(input_ids=example_ids())
    held = sum(t.numel() * t.element_size() for t in be.state.held())
    adapter = sum(w.lora_a.numel() * 4 + w.lora_b.numel() * 4 for w in ad.modules.values())
    dense_targets = sum(dict(model.named_modules())[fqn].in_features * dict(model.named_modules())[fqn].out_features * 4
                        for fqn in ad.modules)
    assert held < adapter + 4096 < dense_targets
    quantized = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert quantized and all(isinstance(m.weight, (bnb.nn.Params4bit, bnb.nn.Int8Params)) for m in quantized)


def test_a_module_without_a_linear_op_or_a_clear_boundary_is_named():
    """A targeted module whose op lora_fx cannot find and whose boundary is not one input / one
    output of the adapter's widths: an error naming it (never a silently skipped module)."""

    class TwoOut(torch.nn.Linear):  # a "linear" module whose forward returns two tensors
        def forward(self, x):
            h = x @ self.weight.T
            return h, h * 2

    class Net(torch.nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            out = self.proj(x)
            return out[0] + out[1] if isinstance(out, tuple) else out

    ad = random_adapter(Net(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["proj"]))
    compiled = torch.compile(Net(TwoOut(8, 8)), backend=lora_fx.backend(ad, inner="aot_eager"))
    with pytest.raises(Exception, match="proj: expected one input of width 8 and one output of width 8"):
        compiled(torch.randn(2, 8))


def test_core_import_needs_neither_bitsandbytes_nor_torchao():
    import subprocess
    import sys

    code = ("import sys; sys.modules['bitsandbytes'] = None; sys.modules['torchao'] = None; import lora_fx; "
            "import lora_fx.quantized, lora_fx.cli")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_training_through_a_kernel_traced_without_gradient_is_refused(dense_dir):
    """A frozen 4-bit model traces bitsandbytes' kernel path without a backward; training through it
    would silently drop the gradient of every A / B before it. It raises, naming the modules."""
    model = bnb_llama(dense_dir).train()
    for p in model.parameters():
        p.requires_grad_(False)
    be = lora_fx.backend(random_adapter(model, LoraConfig(r=4, target_modules=TARGETS)), inner="aot_eager")
    be.parameters()
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    want = r"enable_input_require_grads\(\)(.|\n)*model.layers.1.self_attn.q_proj"
    with pytest.raises(GraphRewriteError, match=want):
        compiled(input_ids=ids, labels=ids)
    with torch.no_grad():  # inference through the same model is fine
        torch.testing.assert_close(logits(compiled, ids), lora_fx.lora_forward(
            model, be.trained_adapter(), input_ids=ids).logits, **TOL)


@pytest.mark.parametrize(("base", "target"), [("torchao_int8", "o_proj"), ("torchao_nf4", "o_proj"),
                                             ("bnb_nf4", "o_proj"), ("bnb_nf4", "model.layers.1.self_attn.o_proj")])
def test_a_graph_dynamo_reuses_for_another_layer_binds_or_is_an_error(dense_dir, base, target):
    """Regional compilation over quantized weights: dynamo reuses layer 0's graph for layer 1, which
    then reads layer 1's adapter. A torchao weight is a wrapper tensor subclass, a bitsandbytes
    module has no linear op (the graph holds its boundary, also for an untargeted module: layer
    0's, when only layer 1's is targeted, which then cannot be bound and raises)."""
    model = bnb_llama(dense_dir) if base == "bnb_nf4" else torchao_llama(base.split("_")[1])
    ad = random_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=[target]))
    ids = example_ids()
    with torch.no_grad():
        ref = lora_fx.lora_forward(model, ad, input_ids=ids, use_cache=False).logits
        assert (ref - model(input_ids=ids, use_cache=False).logits).abs().max() > 1e-3
    be = lora_fx.backend(ad, inner="aot_eager")
    for layer in model.model.layers:
        layer.compile(backend=be)
    if target == "o_proj":
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, ref, **TOL)
        return
    want = r"compiled for \['model.layers.0.self_attn.o_proj'\] and dynamo now runs it for \['model.layers.1.self_"
    with torch.no_grad(), pytest.raises(GraphRewriteError, match=want):
        model(input_ids=ids, use_cache=False)


def test_training_through_a_repacked_4bit_weight_is_refused(tmp_path, dense_dir):
    """bitsandbytes repacks 4-bit weights for its CPU kernel at the first inference call, and its
    training path reads a repacked weight wrongly: training is refused by name, inference is not."""
    model = bnb_llama(dense_dir)
    ids = example_ids(seq=6)
    with torch.no_grad():
        model(input_ids=ids)  # an evaluation first: bitsandbytes repacks every 4-bit weight
    packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules()
              if type(getattr(m, "weight", None)).__name__ == "Params4bit"]
    if not any(packed):  # bitsandbytes repacks only for its AVX512-BF16 kernel
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks a 4-bit weight here")
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()
    ad = random_adapter(model, LoraConfig(r=4, target_modules=TARGETS), seed=1)
    be = lora_fx.backend(ad, inner="aot_eager")
    be.parameters()
    compiled = torch.compile(model, backend=be)
    with pytest.raises(GraphRewriteError, match=r"train before the first inference call(.|\n)*model.layers.0.self_attn."
                                                r"q_proj: its bitsandbytes 4-bit weight was repacked"):
        compiled(input_ids=ids, labels=ids)
    model.eval()
    with torch.no_grad():  # inference through the repacked weights is unchanged
        torch.testing.assert_close(logits(compiled, ids), lora_fx.lora_forward(model, ad, input_ids=ids).logits, **TOL)
