"""One compiled model, many adapters: swap, scale, disable and mixed-adapter batches, vs PEFT."""

import copy

import peft
import pytest
import torch
from cases import Case, example_ids, logits, peft_adapter, tiny_model, train

import lora_fx
from lora_fx import LoraConfig, SwapError
from lora_fx.loading import random_adapter

TOL = dict(atol=1e-4, rtol=1e-4)
TARGETS = {"llama": ["q_proj", "v_proj", "up_proj"], "gpt2": ["c_attn", "c_fc"]}


def make(tmp_path, arch, seed, **kw):
    """A PEFT-saved adapter for ``arch``: (its directory, the PEFT model)."""
    kw.setdefault("target_modules", TARGETS[arch])
    if arch == "gpt2":
        kw.setdefault("fan_in_fan_out", True)
    d = tmp_path / f"{arch}-{seed}"
    _, pm = peft_adapter(Case(f"{arch}-{seed}", arch, kw), str(d), seed=seed)
    return d, pm


def no_recompiles():
    return torch._dynamo.config.patch(error_on_recompile=True)


@pytest.mark.inductor
@pytest.mark.parametrize("mode", ["branch", "fold"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_swap_equals_fresh_compile(tmp_path, arch, mode):
    first, _ = make(tmp_path, arch, 1)
    same, pm_same = make(tmp_path, arch, 2)
    subset, pm_subset = make(tmp_path, arch, 3, target_modules=TARGETS[arch][:1])
    lower, pm_lower = make(tmp_path, arch, 4, r=2, use_rslora=True)
    model = tiny_model(arch)
    be = lora_fx.backend(lora_fx.load_adapter(first), mode=mode, max_rank=4)
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    with torch.no_grad():
        compiled(input_ids=ids)
        with no_recompiles():
            for d, pm in ((same, pm_same), (subset, pm_subset), (lower, pm_lower)):
                be.swap(lora_fx.load_adapter(d))
                torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), **TOL)


def test_swap_through_twenty_adapters(tmp_path):
    model = tiny_model("llama")
    dirs = [make(tmp_path, "llama", seed, r=2 + seed % 3, lora_alpha=1 + seed) for seed in range(20)]
    be = lora_fx.backend(lora_fx.load_adapter(dirs[0][0]), mode="branch", max_rank=4)
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    with torch.no_grad():
        compiled(input_ids=ids)
        with no_recompiles():
            for d, pm in dirs:
                be.swap(lora_fx.load_adapter(d))
                torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), **TOL)


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_swap_refusals_say_what_to_pass(tmp_path, mode):
    small, _ = make(tmp_path, "llama", 1, target_modules=["q_proj"])
    bigger, _ = make(tmp_path, "llama", 2, target_modules=["q_proj", "k_proj"], r=8)
    dora, _ = make(tmp_path, "llama", 3, target_modules=["q_proj"], use_dora=True)
    be = lora_fx.backend(lora_fx.load_adapter(small), mode=mode, inner="aot_eager")
    compiled = torch.compile(tiny_model("llama"), backend=be)
    with torch.no_grad():
        compiled(input_ids=example_ids())
    with pytest.raises(SwapError) as e:
        be.swap(lora_fx.load_adapter(bigger))
    text = str(e.value)
    assert "model.layers.0.self_attn.k_proj: not in the compiled graphs" in text
    if mode == "branch":
        assert "pass max_rank=8" in text
        with pytest.raises(SwapError, match="DoRA needs terms the compiled graph lacks"):
            be.swap(lora_fx.load_adapter(dora))


def test_set_scale_and_disable(tmp_path):
    d, pm = make(tmp_path, "llama", 1)
    model = tiny_model("llama")
    ad = lora_fx.load_adapter(d)
    be = lora_fx.backend(ad, inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    with torch.no_grad():
        full = logits(compiled, ids)
        with be.disabled():  # eager, not compiled (which carries the adapter while it is on: lora_fx.eager)
            base = logits(model, ids)
        with no_recompiles():
            be.set_scale(0.5)
            half = lora_fx.lora_forward(model, ad.scaled(0.5), input_ids=ids).logits
            torch.testing.assert_close(logits(compiled, ids), half, **TOL)
            be.set_scale(0.0)
            torch.testing.assert_close(logits(compiled, ids), base, **TOL)
            be.set_scale(1.0)
            with be.disabled():
                torch.testing.assert_close(logits(compiled, ids), base, **TOL)
            torch.testing.assert_close(logits(compiled, ids), full, **TOL)
            be.disable()
            torch.testing.assert_close(logits(compiled, ids), base, **TOL)
            be.enable()
            torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), **TOL)


def test_disable_restores_replaced_tensors(tmp_path):
    d, pm = make(tmp_path, "gpt2", 1, bias="all", modules_to_save=["ln_f"])
    model = tiny_model("gpt2")
    be = lora_fx.backend(lora_fx.load_adapter(d), mode="fold", inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), **TOL)
        with be.disabled():
            torch.testing.assert_close(logits(compiled, ids), logits(model, ids), **TOL)


def peft_multi(arch, dirs):
    pm = peft.PeftModel.from_pretrained(tiny_model(arch), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        pm.load_adapter(str(d), adapter_name=f"a{i}")
    return pm.eval()


@pytest.mark.inductor
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_matches_peft_adapter_names(tmp_path, arch):
    dirs = [make(tmp_path, arch, 1)[0], make(tmp_path, arch, 2, r=8, lora_alpha=3, use_rslora=True)[0],
            make(tmp_path, arch, 3, r=2, target_modules=TARGETS[arch][:1])[0]]
    pm = peft_multi(arch, dirs)
    model = tiny_model(arch)
    be = lora_fx.backend({f"a{i}": lora_fx.load_adapter(d) for i, d in enumerate(dirs)}, mode="branch")
    compiled = torch.compile(model, backend=be, dynamic=True)
    selections = (["a0", "a1", None, "a2"], ["a2", None, "a0", "a1", "a1"], [None, "a1", "a0"])
    with torch.no_grad():
        for n, rows in enumerate(selections):
            ids = example_ids(batch=len(rows), seq=6, seed=len(rows))
            be.select(rows)
            with torch._dynamo.config.patch(error_on_recompile=n > 0):  # new rows / batch size: no recompile
                got = logits(compiled, ids)
            want = pm(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
            torch.testing.assert_close(got, want, **TOL)
            for i, r in enumerate(rows):  # equals running each row alone
                alone = pm(input_ids=ids[i:i + 1], adapter_names=[r or "__base__"]).logits
                torch.testing.assert_close(got[i:i + 1], alone, **TOL)


@pytest.mark.inductor
def test_mixed_batch_in_generate_follows_beams(tmp_path):
    dirs = [make(tmp_path, "llama", 1)[0], make(tmp_path, "llama", 2)[0]]
    pm = peft_multi("llama", dirs)
    model = tiny_model("llama")
    be = lora_fx.backend({"a0": lora_fx.load_adapter(dirs[0]), "a1": lora_fx.load_adapter(dirs[1])})
    model.forward = torch.compile(model.forward, backend=be)
    ids = example_ids(batch=3, seq=4)
    rows = ["a1", None, "a0"]
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        want = pm.generate(input_ids=ids, adapter_names=[r or "__base__" for r in rows], **kw)
        be.select(rows, beams=2)  # declared: each row's adapter repeated for its 2 beams
        got = model.generate(input_ids=ids, **kw)
    assert torch.equal(got, want)


def test_select_errors(tmp_path):
    d, _ = make(tmp_path, "llama", 1)
    ad = lora_fx.load_adapter(d)
    with pytest.raises(SwapError, match="'sq1': no such adapter"):
        lora_fx.backend({"sql": ad}).select(["sq1"])
    with pytest.raises(SwapError, match="mapping name -> adapter"):
        lora_fx.backend(ad).select(["sql"])
    with pytest.raises(SwapError, match="mode='branch'"):
        lora_fx.backend({"sql": ad}, mode="fold")


def test_base_model_is_not_changed_by_serving(tmp_path):
    d, _ = make(tmp_path, "llama", 1)
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    be = lora_fx.backend(lora_fx.load_adapter(d), mode="fold", inner="aot_eager")
    with torch.no_grad():
        torch.compile(model, backend=be)(input_ids=example_ids())
        be.set_scale(2.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("use_dora", [False, True])
def test_fold_in_place_merges_and_restores_bit_for_bit(tmp_path, use_dora):
    d, pm = make(tmp_path, "llama", 1, use_dora=use_dora, target_modules=["q_proj", "down_proj"])
    other, pm_other = make(tmp_path, "llama", 2, use_dora=use_dora, target_modules=["q_proj"])
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    be = lora_fx.backend(lora_fx.load_adapter(d), mode="fold", inner="aot_eager", inplace=True)
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), **TOL)
        assert be.state.derived and not any(d.tensors for d in be.state.derived.values()), "nothing extra held"
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(model.state_dict()[q], before[q]), "merged into the model's own weight"
        with no_recompiles():
            be.swap(lora_fx.load_adapter(other))
            torch.testing.assert_close(logits(compiled, ids), logits(pm_other, ids), **TOL)
            be.set_scale(0.0)
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), k
            be.set_scale(1.0)
            torch.testing.assert_close(logits(compiled, ids), logits(pm_other, ids), **TOL)
        be.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_set_scale_zero_turns_dora_off(tmp_path):
    d, _ = make(tmp_path, "llama", 1, use_dora=True)
    model = tiny_model("llama")
    be = lora_fx.backend(lora_fx.load_adapter(d), inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    with torch.no_grad():
        compiled(input_ids=ids)
        be.set_scale(0.0)
        torch.testing.assert_close(logits(compiled, ids), logits(model, ids), **TOL)


def test_optimizer_can_be_built_before_the_first_call_and_trained_adapter_round_trips(tmp_path):
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    ad = lora_fx.init_adapter(model, lora_fx.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]), seed=0)
    be = lora_fx.backend(ad, inner="aot_eager", max_rank=6)
    opt = torch.optim.SGD(be.parameters(), lr=0.5)
    assert len(be.parameters()) == 2 * len(ad.modules)
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    train(compiled, opt, ids, 2)
    trained = be.trained_adapter()
    trained.save(tmp_path)
    pm = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)).eval()
    with torch.no_grad():
        want = logits(pm, ids)
        with be.disabled():
            assert (want - logits(model, ids)).abs().max() > 1e-3, "training changed the adapter"
        torch.testing.assert_close(logits(compiled, ids), want, **TOL)


def test_adapters_in_another_dtype_than_the_graphs_are_refused():
    """The graphs compute each module in one dtype: a bf16 adapter swapped into a backend built for
    fp32 LoRA tensors (or mixed with one) would be computed in fp32 silently (3e-3 off its own
    reference on an effect of 0.5), and the reverse rounded to bf16. Refused, naming the module."""
    model = tiny_model("llama")
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    fp32, bf16 = random_adapter(model, cfg, seed=1), lora_fx.init_adapter(model, cfg, dtype=torch.bfloat16)
    with pytest.raises(SwapError, match=r"model.layers.0.self_attn.q_proj: expected the adapters' LoRA tensors in "
                                        r"one dtype, found \['torch.bfloat16', 'torch.float32'\]"):
        lora_fx.backend({"a": fp32, "b": bf16})
    with pytest.raises(SwapError, match="one dtype"):
        lora_fx.backend(fp32, reserve=[bf16])
    be = lora_fx.backend(fp32, inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    with torch.no_grad():
        before = logits(compiled, ids)
        with pytest.raises(SwapError, match=r"q_proj: expected LoRA tensors in torch.float32 \(the compiled graphs "
                                            r"compute in it\), found torch.bfloat16"):
            be.swap(bf16)
        torch.testing.assert_close(logits(compiled, ids), before)  # the refused swap changed nothing
