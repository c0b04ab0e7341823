"""One test per row of the README's "Supported PEFT features" table that no other file covers:
each fails when its row breaks."""

import copy

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
            want = (logits(model, ids[i:i + 1]) if name is None
                    else lora_fx.lora_forward(model, ads[name], input_ids=ids[i:i + 1]).logits)
            torch.testing.assert_close(got[i:i + 1], want, **TOL)
        assert (got[0] - got[2]).abs().max() > 1e-3


def test_mixed_batch_embedding_lora_gives_the_padding_rows_no_gradient():
    """As PEFT's lookup with padding_idx: gradient reaches the looked-up rows of each slot's A,
    never the padding row (Phi-3's tiny config: pad_token_id 0, and the ids hold it)."""
    model = tiny_model("phi3")
    for p in model.parameters():
        p.requires_grad_(False)
    ads = {n: random_adapter(model, LoraConfig(r=2, target_modules=["embed_tokens"]), seed=i)
           for i, n in enumerate("ab")}
    be = lora_fx.backend(ads, inner="aot_eager")
    be.select(["a", "b"])
    ids = example_ids(batch=2, seq=5)
    ids[:, 1] = 0
    params = be.named_parameters()
    compiled = torch.compile(model, backend=be)
    compiled(input_ids=ids, labels=ids).loss.backward()
    grad = params["model.embed_tokens"]["lora_a"].grad  # ((slots + 1) * vocab, R): slot 0 is the base model
    vocab = model.config.vocab_size
    for slot, row in ((1, 0), (2, 1)):
        rows = grad[slot * vocab:(slot + 1) * vocab]
        assert torch.count_nonzero(rows[0]) == 0
        assert all(torch.count_nonzero(rows[int(i)]) > 0 for i in ids[row, :-1] if i != 0)  # the last: no loss term


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
    compiled = torch.compile(base, backend=lora_fx.backend(ad, mode=mode, inner="aot_eager"))
    ids = example_ids()
    with torch.no_grad():
        want, got = logits(pm, ids).float(), logits(compiled, ids).float()
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
