"""load_adapter, Adapter.save, init_adapter and validation: each malformed input has its own error."""

import copy
import dataclasses
import json
import os
import pickle

import peft
import pytest
import torch
from cases import CASES, example_ids, logits, peft_adapter, perturb, tiny_model
from safetensors.torch import save_file

import lora_fx
from lora_fx import AdapterConfigError, AdapterWeightsError, LoraConfig, ModelMismatchError

CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc"]}
A, B = "base_model.model.fc.lora_A.weight", "base_model.model.fc.lora_B.weight"


def write(tmp_path, config=CONFIG, tensors=None, fmt="safetensors"):
    tensors = {A: torch.randn(2, 3), B: torch.randn(4, 2)} if tensors is None else tensors
    if config is not None:
        (tmp_path / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if fmt == "safetensors":
        save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    elif fmt == "bin":
        torch.save(tensors, str(tmp_path / "adapter_model.bin"))
    return tmp_path


def test_loads_minimal_adapter(tmp_path):
    ad = lora_fx.load_adapter(write(tmp_path), scale=0.5)
    w = ad.modules["fc"]
    assert w.rank == 2 and w.scale == pytest.approx(0.5 * 4 / 2)
    assert w.lora_a.shape == (2, 3) and w.lora_b.shape == (4, 2)


def test_loads_bin_with_weights_only(tmp_path):
    ad = lora_fx.load_adapter(write(tmp_path, fmt="bin"), dtype=torch.float64)
    assert ad.modules["fc"].lora_a.dtype == torch.float64


def test_missing_config(tmp_path):
    with pytest.raises(AdapterConfigError, match="adapter_config.json"):
        lora_fx.load_adapter(write(tmp_path, config=None))


def test_invalid_json(tmp_path):
    with pytest.raises(AdapterConfigError, match="valid JSON"):
        lora_fx.load_adapter(write(tmp_path, config="{r: 2"))


def test_config_not_an_object(tmp_path):
    with pytest.raises(AdapterConfigError, match="JSON object"):
        lora_fx.load_adapter(write(tmp_path, config="[1, 2]"))


def test_wrong_json_types_listed_together(tmp_path):
    bad = {**CONFIG, "r": "8", "lora_alpha": None, "use_rslora": "yes", "target_modules": 3}
    with pytest.raises(AdapterConfigError) as e:
        lora_fx.load_adapter(write(tmp_path, config=bad))
    text = str(e.value)
    for field in ("r:", "lora_alpha:", "use_rslora:", "target_modules:"):
        assert field in text
    assert len(e.value.problems) == 4


@pytest.mark.parametrize("field,value", [("use_qalora", True), ("layer_replication", [[0, 1]]),
                                         ("alora_invocation_tokens", [1, 2]), ("kasa_config", {"beta": 1e-4}),
                                         ("trainable_token_indices", [1]), ("peft_type", "LOHA")])
def test_refused_variant_names_field(tmp_path, field, value):
    with pytest.raises(AdapterConfigError, match=field):
        lora_fx.load_adapter(write(tmp_path, config={**CONFIG, field: value}))


def test_target_parameters_without_tensors_is_named(tmp_path):
    with pytest.raises(lora_fx.AdapterWeightsError, match="target_parameters entry 'head.weight': expected LoRA"):
        lora_fx.load_adapter(write(tmp_path, config={**CONFIG, "target_parameters": ["head.weight"]}))


def test_two_target_parameters_of_one_module_are_named(tmp_path):
    cfg = {**CONFIG, "target_parameters": ["fc.weight", "fc.bias"]}
    with pytest.raises(lora_fx.AdapterWeightsError, match="expected one parameter per module, found several of 'fc'"):
        lora_fx.load_adapter(write(tmp_path, config=cfg))


def test_unknown_fields_ignored(tmp_path):
    ad = lora_fx.load_adapter(write(tmp_path, config={**CONFIG, "some_future_field": 1}))
    assert "fc" in ad.modules


def test_missing_weight_file(tmp_path):
    with pytest.raises(AdapterWeightsError, match="adapter_model.safetensors or adapter_model.bin"):
        lora_fx.load_adapter(write(tmp_path, fmt=None))


def test_truncated_safetensors(tmp_path):
    path = write(tmp_path) / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterWeightsError, match="valid safetensors"):
        lora_fx.load_adapter(tmp_path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_bin_refused(tmp_path):
    write(tmp_path, fmt=None)
    with open(tmp_path / "adapter_model.bin", "wb") as f:
        pickle.dump({A: Evil()}, f)
    with pytest.raises(AdapterWeightsError, match="weights_only"):
        lora_fx.load_adapter(tmp_path)


def test_a_without_b(tmp_path):
    with pytest.raises(AdapterWeightsError, match="fc: expected lora_B.weight with lora_A.weight"):
        lora_fx.load_adapter(write(tmp_path, tensors={A: torch.randn(2, 3)}))


def test_wrong_shapes(tmp_path):
    with pytest.raises(AdapterWeightsError, match=r"same r, found \(2, 3\) and \(4, 3\)"):
        lora_fx.load_adapter(write(tmp_path, tensors={A: torch.randn(2, 3), B: torch.randn(4, 3)}))


def test_rank_disagrees_with_config(tmp_path):
    with pytest.raises(AdapterWeightsError, match="expected rank 2 .* found 3"):
        lora_fx.load_adapter(write(tmp_path, tensors={A: torch.randn(3, 3), B: torch.randn(4, 3)}))


def test_nan_weights(tmp_path):
    a = torch.randn(2, 3)
    a[0, 1] = float("nan")
    with pytest.raises(AdapterWeightsError, match="fc.lora_A.weight: expected finite values, found 1 NaN"):
        lora_fx.load_adapter(write(tmp_path, tensors={A: a, B: torch.randn(4, 2)}))


def test_tensor_for_no_module(tmp_path):
    tensors = {A: torch.randn(2, 3), B: torch.randn(4, 2), "base_model.model.other.weight": torch.randn(2)}
    with pytest.raises(AdapterWeightsError, match="other.weight: a tensor for no module"):
        lora_fx.load_adapter(write(tmp_path, tensors=tensors))


def test_module_not_in_target_modules(tmp_path):
    tensors = {A.replace("fc", "gc"): torch.randn(2, 3), B.replace("fc", "gc"): torch.randn(4, 2)}
    with pytest.raises(AdapterWeightsError, match="gc: has LoRA tensors, but the config's target_modules"):
        lora_fx.load_adapter(write(tmp_path, tensors=tensors))


def test_dora_magnitude_missing(tmp_path):
    with pytest.raises(AdapterWeightsError, match="lora_magnitude_vector"):
        lora_fx.load_adapter(write(tmp_path, config={**CONFIG, "use_dora": True}))


def test_every_problem_in_one_error(tmp_path):
    a = torch.full((3, 3), float("inf"))
    with pytest.raises(AdapterWeightsError) as e:
        lora_fx.load_adapter(write(tmp_path, tensors={A: a, B: torch.randn(4, 3), "x.y": torch.ones(1)}))
    assert len(e.value.problems) == 3  # key prefix, inf, rank


def test_missing_directory():
    with pytest.raises(AdapterConfigError, match="no such directory"):
        lora_fx.load_adapter("/nonexistent/adapter")


def test_repo_id_not_in_cache_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdapterConfigError, match="huggingface-cli download someone/some-lora"):
        lora_fx.load_adapter("someone/some-lora")


def test_check_reports_model_mismatches(tmp_path):
    model = torch.nn.Sequential()
    model.add_module("fc", torch.nn.Linear(5, 4))
    ad = lora_fx.load_adapter(write(tmp_path))
    with pytest.raises(ModelMismatchError, match=r"fc.lora_A: expected shape \(2, 5\), found \(2, 3\)"):
        ad.check(model)
    ad.modules["missing"] = ad.modules["fc"]
    with pytest.raises(ModelMismatchError) as e:
        ad.check(model)
    assert any("missing: adapter has LoRA tensors for it, the model has no such module" in p for p in e.value.problems)


def test_check_pattern_matching_nothing(tmp_path):
    model = torch.nn.Sequential()
    model.add_module("fc", torch.nn.Linear(3, 4))
    ad = lora_fx.load_adapter(write(tmp_path, config={**CONFIG, "target_modules": ["fc", "typo_proj"]}))
    with pytest.raises(ModelMismatchError, match="'typo_proj': matches no module"):
        ad.check(model)


def test_check_warns_on_other_base_model(tmp_path):
    model = tiny_model("llama")
    model.config.name_or_path = "org/model-a"
    ad = lora_fx.init_adapter(model, LoraConfig(target_modules=["q_proj"], base_model_name_or_path="org/model-b"))
    with pytest.warns(UserWarning, match="model-b"):
        ad.check(model)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("llama_dora", "gpt2_conv1d", "llama_embedding",
                                                                 "qwen2_lora_bias", "gpt2_bias_all_modules_to_save")],
                         ids=lambda c: c.name)
def test_save_round_trips_through_peft(tmp_path, case):
    base, pm = peft_adapter(case, str(tmp_path / "peft"))
    ad = lora_fx.load_adapter(tmp_path / "peft")
    ad.save(tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(tiny_model(case.arch), str(tmp_path / "ours")).eval()
    ids = example_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, ids), logits(pm, ids), atol=1e-4, rtol=1e-4)


def test_save_keeps_load_time_scale(tmp_path):
    case = CASES[0]
    base, pm = peft_adapter(case, str(tmp_path / "peft"))
    ad = lora_fx.load_adapter(tmp_path / "peft", scale=0.5)
    ad.save(tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(tiny_model(case.arch), str(tmp_path / "ours")).eval()
    ids = example_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, ids), lora_fx.lora_forward(base, ad, input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(target_modules=["q_proj", "v_proj"]),
                                dict(target_modules=["q_proj", "embed_tokens"], use_rslora=True),
                                dict(target_modules=["down_proj"], use_dora=True),
                                dict(target_modules="all-linear", lora_bias=True)], ids=["lora", "emb", "dora", "bias"])
def test_init_adapter_is_identity_then_round_trips(tmp_path, kw):
    base = tiny_model("llama")
    ad = lora_fx.init_adapter(base, LoraConfig(r=4, lora_alpha=8, **kw), seed=0)
    ids = example_ids()
    with torch.no_grad():
        plain = logits(base, ids)
        torch.testing.assert_close(lora_fx.lora_forward(base, ad, input_ids=ids).logits, plain)
        for w in ad.modules.values():
            perturb_weights(w)
        ours = lora_fx.lora_forward(base, ad, input_ids=ids).logits
        assert (ours - plain).abs().max() > 1e-3
    ad.save(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, ids), ours, atol=1e-4, rtol=1e-4)


def test_init_adapter_matches_peft_init_distribution():
    base = tiny_model("llama")
    ad = lora_fx.init_adapter(base, LoraConfig(r=4, target_modules=["q_proj"]), seed=0)
    a = ad.modules["model.layers.0.self_attn.q_proj"].lora_a
    pm = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pa = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt(5)) on (r, in=32): U(-1/sqrt(in), 1/sqrt(in))
    for t in (a, pa.detach()):
        assert t.shape == (4, 32)
        assert t.abs().max() <= bound
        assert t.min() < -0.7 * bound and t.max() > 0.7 * bound, "spread over the whole interval"
        torch.testing.assert_close(t.std(), torch.tensor(bound / 3**0.5), atol=0, rtol=0.25)
    assert torch.count_nonzero(ad.modules["model.layers.0.self_attn.q_proj"].lora_b) == 0
    other = lora_fx.init_adapter(base, LoraConfig(r=4, target_modules=["q_proj"]), seed=1)
    assert not torch.equal(other.modules["model.layers.0.self_attn.q_proj"].lora_a, a), "the seed is used"


def test_init_adapter_trains_from_the_first_step():
    """B = 0 and A != 0: the first step's gradient reaches B (with A = 0 too, nothing would ever train)."""
    base = tiny_model("llama")
    ad = lora_fx.init_adapter(base, LoraConfig(r=4, target_modules=["q_proj"]), seed=0)
    leaves = {fqn: w.lora_b.clone().requires_grad_(True) for fqn, w in ad.modules.items()}
    live = copy.copy(ad)
    live.modules = {fqn: dataclasses.replace(w, lora_b=leaves[fqn]) for fqn, w in ad.modules.items()}
    ids = example_ids()
    lora_fx.lora_forward(base, live, input_ids=ids, labels=ids).loss.backward()
    assert all(b.grad.abs().sum() > 1e-4 for b in leaves.values())


def perturb_weights(w):
    gen = torch.Generator().manual_seed(7)
    for t in (w.lora_a, w.lora_b, w.bias):
        if t is not None:
            t.add_(0.3 * torch.randn(t.shape, generator=gen))
    if w.magnitude is not None:
        w.magnitude.mul_(1.2)


_ = perturb  # the PEFT-side perturbation lives in cases.py
