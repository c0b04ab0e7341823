"""One test per row of the README's "Supported PEFT features" table that no other file covers:
each fails when its row breaks."""

import copy
import dataclasses

import peft
import pytest
import torch
from cases import Case, example_ids, logits, peft_adapter, tiny_model, two_adapters_peft
from test_loading import CONFIG, write

import lora_fx
from lora_fx import AdapterConfigError, LoraConfig, ModelMismatchError
from lora_fx.config import REFUSED_FIELDS
from lora_fx.loading import random_adapter

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_summed_adapters_in_the_backend_match_peft_with_two_active(tmp_path, mode):
    base, pm, dirs = two_adapters_peft(tmp_path)
    adapters = [lora_fx.load_adapter(d) for d in dirs]
    compiled = torch.compile(base, backend=lora_fx.backend(adapters, mode=mode, inner="aot_eager"))
    ids = example_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), **TOL)


@pytest.mark.parametrize("variant", ["dora", "lora_bias", "embedding"])
def test_mixed_batches_with_dora_lora_bias_and_embeddings(variant):
    model = tiny_model("qwen2")
    kw = {"dora": dict(use_dora=True, target_modules=["q_proj", "down_proj"]),
          "lora_bias": dict(lora_bias=True, target_modules=["q_proj", "o_proj", "up_proj"]),  # with / without base bias
          "embedding": dict(target_modules=["embed_tokens", "v_proj"])}[variant]
    ads = {n: random_adapter(model, LoraConfig(r=2 + i, lora_alpha=4, **kw), seed=i) for i, n in enumerate("ab")}
    rows = ["b", None, "a"]
    ids = example_ids(batch=3, seq=5)
    with torch.no_grad():
        be = lora_fx.backend(ads, inner="aot_eager")
        compiled = torch.compile(model, backend=be)
        be.select(rows)
        got = logits(compiled, ids)
        for i, name in enumerate(rows):
            with be.disabled():
                base = logits(model, ids[i:i + 1])
            want = base if name is None else lora_fx.lora_forward(model, ads[name], input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(got[i:i + 1], want, **TOL)
        assert (got[0] - got[2]).abs().max() > 1e-3


@pytest.mark.parametrize("freq", [False, True])
def test_mixed_batch_embedding_lora_gradients_match_the_reference(freq):
    """Each row's A gets the gradient the eager reference (PEFT's lookup: the embedding's
    padding_idx and scale_grad_by_freq, frequencies counted in that adapter's rows) gives it; the
    padding row none. Phi-3's tiny config has pad_token_id 0, and the ids hold it, twice per row."""
    model = tiny_model("phi3")
    model.model.embed_tokens.scale_grad_by_freq = freq
    for p in model.parameters():
        p.requires_grad_(False)
    ads = {n: random_adapter(model, LoraConfig(r=2, target_modules=["embed_tokens"]), seed=i)
           for i, n in enumerate("ab")}
    ids = example_ids(batch=2, seq=6)
    ids[:, 1] = ids[:, 4] = 0
    ids[:, 3] = ids[:, 2]  # a repeated id: scale_grad_by_freq divides its gradient by 2
    w = torch.randn(2, 6, model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    be = lora_fx.backend(ads, inner="aot_eager")
    be.select(["a", "b"])
    params = be.named_parameters()
    (torch.compile(model, backend=be)(input_ids=ids).logits * w).sum().backward()
    grad = params["model.embed_tokens"]["lora_a"].grad  # ((slots + 1) * vocab, R): slot 0 is the base model
    vocab = model.config.vocab_size
    for slot, (row, name) in enumerate(zip((0, 1), "ab"), start=1):
        ad = ads[name]
        wt = ad.modules["model.embed_tokens"]
        a = wt.lora_a.clone().requires_grad_(True)
        live = dataclasses.replace(ad, modules={"model.embed_tokens": dataclasses.replace(wt, lora_a=a)})
        (lora_fx.lora_forward(model, live, input_ids=ids[row:row + 1]).logits * w[row:row + 1]).sum().backward()
        got = grad[slot * vocab:(slot + 1) * vocab, :2]  # A stored transposed: (vocab, R)
        torch.testing.assert_close(got, a.grad.T, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(got[0]) == 0 and torch.count_nonzero(got) > 0


def test_modules_to_save_refused_in_mixed_batches(tmp_path):
    case = Case("m", "gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True,
                                                              modules_to_save=["ln_f"]))
    peft_adapter(case, str(tmp_path))
    ad = lora_fx.load_adapter(tmp_path)
    assert ad.overrides
    with pytest.raises(ModelMismatchError, match="expected none in a mixed-adapter batch"):
        lora_fx.backend({"a": ad, "b": ad})


def test_a_repo_id_in_the_local_hub_cache_loads(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--acme--tiny-lora" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    write(snapshot)
    (tmp_path / "models--acme--tiny-lora" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-lora" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    ad = lora_fx.load_adapter("acme/tiny-lora")
    assert set(ad.modules) == {"fc"} and ad.name == "tiny-lora"


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_fp16_model_matches_peft(tmp_path, mode):
    case = Case("fp16", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"]))
    base, _ = peft_adapter(case, str(tmp_path))
    base = base.to(torch.float16)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), autocast_adapter_dtype=False).eval()
    ad = lora_fx.load_adapter(tmp_path, dtype=torch.float16)
    be = lora_fx.backend(ad, mode=mode, inner="aot_eager")
    compiled = torch.compile(base, backend=be)
    ids = example_ids()
    with torch.no_grad():
        want, got = logits(pm, ids).float(), logits(compiled, ids).float()
        with be.disabled():
            assert (want - logits(base, ids).float()).abs().max() > 0.05
    assert logits(compiled, ids).dtype == torch.float16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("field", sorted(REFUSED_FIELDS))
def test_every_refused_field_is_named(tmp_path, field):
    with pytest.raises(AdapterConfigError, match=field):
        lora_fx.load_adapter(write(tmp_path, config={**CONFIG, field: {"x": 1}}))


def test_non_lora_peft_type_is_named(tmp_path):
    with pytest.raises(AdapterConfigError, match="peft_type"):
        lora_fx.load_adapter(write(tmp_path, config={**CONFIG, "peft_type": "IA3"}))


def test_dora_on_embeddings_needs_its_magnitude(tmp_path):
    # DoRA on embeddings is supported (tests/test_peft_matrix.py); without its magnitude it is refused
    ids = {"base_model.model.emb.lora_embedding_A": torch.randn(2, 5),
           "base_model.model.emb.lora_embedding_B": torch.randn(3, 2)}
    cfg = {**CONFIG, "target_modules": ["emb"], "use_dora": True}
    with pytest.raises(lora_fx.AdapterWeightsError, match="emb: expected lora_magnitude_vector"):
        lora_fx.load_adapter(write(tmp_path, config=cfg, tensors=ids))
