"""lora_fx.targets agrees with PEFT's own matcher on generated names and patterns."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from lora_fx import LoraConfig, targets
from lora_fx.errors import AdapterConfigError

segment = st.sampled_from(["model", "layers", "h", "blocks", "self_attn", "mlp", "attn", "q_proj", "v_proj",
                           "k_proj", "up_proj", "down_proj", "c_attn", "fc1", "0", "1", "2", "11"])
fqns = st.lists(segment, min_size=1, max_size=6).map(".".join)
names = st.sampled_from(["q_proj", "v_proj", "k_proj", "up_proj", "attn.c_attn", "mlp.down_proj", "layers.1.q_proj",
                         "fc1", "self_attn.q_proj", "model.layers.0.mlp.up_proj"])
regexes = st.sampled_from([r".*q_proj", r".*\.(q|v)_proj", r"model\.layers\.\d+\..*", r".*layers\.1\..*", r"fc1"])


@st.composite
def configs(draw):
    kw = {}
    kw["target_modules"] = draw(st.one_of(st.lists(names, min_size=1, max_size=4, unique=True), regexes))
    kw["exclude_modules"] = draw(st.one_of(st.none(), st.lists(names, max_size=2, unique=True), regexes))
    if isinstance(kw["target_modules"], list) and draw(st.booleans()):
        kw["layers_to_transform"] = draw(st.one_of(st.integers(0, 2), st.lists(st.integers(0, 11), max_size=3)))
        kw["layers_pattern"] = draw(st.one_of(st.none(), st.sampled_from(["layers", "h", ["blocks", "layers"]])))
    kw["modules_to_save"] = draw(st.one_of(st.none(), st.lists(st.sampled_from(["fc1", "mlp"]), max_size=1)))
    kw["rank_pattern"] = draw(st.dictionaries(names, st.integers(1, 16), max_size=3))
    kw["alpha_pattern"] = draw(st.dictionaries(names, st.integers(1, 64), max_size=3))
    kw["use_rslora"] = draw(st.booleans())
    kw["r"], kw["lora_alpha"] = draw(st.integers(1, 16)), draw(st.integers(1, 64))
    return kw


@given(configs(), fqns)
def test_is_target_matches_peft(kw, fqn):
    ours = targets.is_target(LoraConfig(**kw), fqn)
    theirs = check_target_module_exists(PeftLoraConfig(**kw), fqn)
    assert ours == bool(theirs)


@given(st.dictionaries(names, st.integers(1, 16), max_size=4), fqns)
def test_pattern_key_matches_peft(patterns, fqn):
    assert targets.pattern_key(patterns, fqn) == get_pattern_key(list(patterns), fqn)


@given(configs(), fqns, st.floats(0.1, 4))
def test_scale_is_alpha_over_r_times_multiplier(kw, fqn, mult):
    cfg = LoraConfig(**kw)
    r = kw["rank_pattern"].get(get_pattern_key(list(kw["rank_pattern"]), fqn), kw["r"])
    alpha = kw["alpha_pattern"].get(get_pattern_key(list(kw["alpha_pattern"]), fqn), kw["lora_alpha"])
    want = mult * (alpha / math.sqrt(r) if kw["use_rslora"] else alpha / r)
    assert targets.rank_of(cfg, fqn) == r
    assert targets.scale_of(cfg, fqn, mult) == pytest.approx(want)


def test_layer_index_takes_first_number():
    assert targets.layer_index("model.layers.3.experts.7.w1", None) == 3
    assert targets.layer_index("model.layers.3.experts.7.w1", "experts") == 7
    assert targets.layer_index("lm_head", None) is None


def test_all_linear_needs_model():
    with pytest.raises(AdapterConfigError, match="all-linear"):
        targets.is_target(LoraConfig(target_modules="all-linear"), "model.layers.0.q_proj")


def test_all_linear_excludes_output_head():
    from cases import tiny_model

    model = tiny_model("llama")
    got = targets.resolve_target_modules(LoraConfig(target_modules="all-linear"), model)
    assert "lm_head" not in got
    assert "model.layers.0.self_attn.q_proj" in got and "model.layers.1.mlp.down_proj" in got


def test_default_targets_per_architecture():
    from cases import tiny_model

    assert targets.resolve_target_modules(LoraConfig(), tiny_model("gpt2")) == ["c_attn"]
    assert targets.resolve_target_modules(LoraConfig(), tiny_model("llama")) == ["q_proj", "v_proj"]


def test_unknown_architecture_without_targets_is_an_error():
    import torch

    with pytest.raises(AdapterConfigError, match="no default"):
        targets.resolve_target_modules(LoraConfig(), torch.nn.Linear(2, 2))


def test_unmatched_patterns_named():
    cfg = LoraConfig(target_modules=["q_proj", "qq_proj"])
    assert targets.unmatched_patterns(cfg, ["model.q_proj", "model.k_proj"]) == ["qq_proj"]
