"""lora_fx.reference reproduces PEFT's outputs on real transformers architectures."""


import pytest
import torch
from cases import CASE_IDS, CASES, example_ids, logits, peft_adapter, tiny_model, two_adapters_peft

import lora_fx


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_matches_peft(tmp_path, case):
    base, pm = peft_adapter(case, str(tmp_path))
    ad = lora_fx.load_adapter(tmp_path)
    ids = example_ids()
    with torch.no_grad():
        want = logits(pm, ids)
        with lora_fx.apply_lora(base, ad):
            got = logits(base, ids)
        assert (want - logits(base, ids)).abs().max() > 1e-3, "the adapter must change the outputs"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_reference_restores_the_model(tmp_path):
    case = next(c for c in CASES if c.name == "gpt2_bias_all_modules_to_save")
    base, _ = peft_adapter(case, str(tmp_path))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = example_ids()
    with torch.no_grad():
        plain = logits(base, ids)
        lora_fx.lora_forward(base, lora_fx.load_adapter(tmp_path), input_ids=ids)
        torch.testing.assert_close(logits(base, ids), plain, atol=0, rtol=0)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])


def test_summed_adapters_match_peft_with_two_active(tmp_path):
    base, pm, dirs = two_adapters_peft(tmp_path)
    adapters = [lora_fx.load_adapter(d) for d in dirs]
    ids = example_ids()
    with torch.no_grad():
        torch.testing.assert_close(lora_fx.lora_forward(base, adapters, input_ids=ids).logits, logits(pm, ids),
                                   atol=1e-4, rtol=1e-4)


def test_load_time_scale_scales_the_update(tmp_path):
    base, _ = peft_adapter(CASES[0], str(tmp_path))
    ids = example_ids()
    with torch.no_grad():
        plain = logits(base, ids)
        full = lora_fx.lora_forward(base, lora_fx.load_adapter(tmp_path), input_ids=ids).logits
        zero = lora_fx.lora_forward(base, lora_fx.load_adapter(tmp_path, scale=0.0), input_ids=ids).logits
        twice = lora_fx.lora_forward(base, [lora_fx.load_adapter(tmp_path, scale=0.5)] * 2, input_ids=ids).logits
    torch.testing.assert_close(zero, plain)
    torch.testing.assert_close(twice, full, atol=1e-5, rtol=1e-5)


def test_dora_cannot_be_summed(tmp_path):
    case = next(c for c in CASES if c.name == "llama_dora")
    base, _ = peft_adapter(case, str(tmp_path))
    ad = lora_fx.load_adapter(tmp_path)
    with pytest.raises(lora_fx.ModelMismatchError, match="DoRA"):
        lora_fx.lora_forward(base, [ad, ad], input_ids=example_ids())


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("llama_dora", "gpt2_conv1d", "qwen2_lora_bias",
                                                                 "llama_embedding")], ids=lambda c: c.name)
def test_merged_state_dict_matches_peft_merge(tmp_path, case):
    base, pm = peft_adapter(case, str(tmp_path))
    merged = tiny_model(case.arch)
    ad = lora_fx.load_adapter(tmp_path)
    if case.name == "qwen2_lora_bias":  # PEFT cannot merge lora_bias into a layer without bias
        with pytest.raises(lora_fx.ModelMismatchError, match="lora_bias needs a base bias"):
            lora_fx.merged_state_dict(base, ad)
        return
    merged.load_state_dict(lora_fx.merged_state_dict(base, ad))
    ids = example_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, ids), logits(pm, ids), atol=1e-4, rtol=1e-4)


def test_merging_into_a_tied_weight_is_refused():
    """GPT-2 ties wte and lm_head: a merged checkpoint holds one tensor for both, so merging the
    embedding's LoRA would reach the head (or be lost when the model ties them on loading)."""
    base = tiny_model("gpt2")
    assert base.lm_head.weight is base.transformer.wte.weight
    ad = lora_fx.init_adapter(base, lora_fx.LoraConfig(target_modules=["wte", "c_attn"]))
    with pytest.raises(lora_fx.ModelMismatchError, match=r"transformer\.wte\.weight: is also \['lm_head\.weight'\]"):
        lora_fx.merged_state_dict(base, ad)
    untied = lora_fx.init_adapter(base, lora_fx.LoraConfig(target_modules=["c_attn"]))
    assert "transformer.h.0.attn.c_attn.weight" in lora_fx.merged_state_dict(base, untied)
