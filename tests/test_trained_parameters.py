"""Every parameter PEFT trains gets PEFT's gradient through lora_fx's compiled graphs, or the
training is refused naming it: a base trained under a fold backend (a full fine-tune), lora_B's
bias (lora_bias), DoRA's magnitude and modules_to_save copies under branch mode."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import example_ids, perturb, tiny_model

import lora_fx
from lora_fx import GraphRewriteError

peft = pytest.importorskip("peft")

TOL = dict(atol=1e-5, rtol=1e-5)


def _peft(base: torch.nn.Module, **kwargs) -> torch.nn.Module:
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                  **kwargs))
    perturb(pm, 1)
    return pm


def _base_named(pm: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """PEFT's base parameters under the base model's own names."""
    return {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in pm.named_parameters()
            if "lora_" not in n and "modules_to_save" not in n}


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize(("arch", "kwargs"), [
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_bias=True)),
    ("qwen2", dict(target_modules=["v_proj", "o_proj"], use_dora=True)),
], ids=["llama", "gpt2_conv1d_lora_bias", "qwen2_dora"])
def test_fold_over_a_trained_base_gives_the_base_peft_gradients(arch, kwargs):
    """The folded op reads W' + (W - W.detach()): W''s value, W''s gradient on W, which is PEFT's
    gradient of its base weight (and of the base bias a lora_bias folds into); DoRA's scaled per
    output row by m / ||W + s B A|| (detached, as PEFT's norm). Two SGD steps of
    the whole base, the adapter fixed (fold does not train A / B): the gradients of the first, the
    losses of both (the second reads W' folded again over the trained W) and the trained weights
    equal PEFT's at 1e-5."""
    base = tiny_model(arch)
    pm = _peft(base, **kwargs)
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" not in n)
    adapter = lora_fx.from_peft(copy.deepcopy(pm))[1]["default"]
    model = copy.deepcopy(base)
    compiled = torch.compile(model, backend=lora_fx.backend(adapter, mode="fold", inner="aot_eager"))
    ours, theirs = dict(model.named_parameters()), _base_named(pm)
    assert ours.keys() == theirs.keys()
    opts = [torch.optim.SGD(m.values(), lr=0.1) for m in (ours, theirs)]
    ids = example_ids()
    with torch.no_grad():
        assert (_loss(pm, ids) - _loss(base, ids)).abs() > 1e-3  # the adapter changes the model
    for step in range(2):
        for opt in opts:
            opt.zero_grad()
        loss, want = _loss(compiled, ids), _loss(pm, ids)
        loss.backward()
        want.backward()
        torch.testing.assert_close(loss, want, **TOL)
        missing = [n for n, p in ours.items() if p.grad is None]
        assert missing == []
        if step == 0:  # the second's differ by fold's rounding (W' x vs W x + B A x) carried through a step
            torch.testing.assert_close({n: p.grad for n, p in ours.items()}, {n: p.grad for n, p in theirs.items()},
                                       **TOL)
        for opt in opts:
            opt.step()
    torch.testing.assert_close({n: p.detach() for n, p in ours.items()}, {n: p.detach() for n, p in theirs.items()},
                               **TOL)


def test_fold_in_place_and_modules_to_save_refuse_the_backward_of_a_trained_base():
    """In place the model's tensor holds W', and a modules_to_save copy replaces the model's
    parameter: a forward with gradients on still runs (an inference call that did not turn them
    off); a backward through it is refused, naming each."""
    base = tiny_model("llama")
    pm = _peft(base, target_modules=["q_proj"], modules_to_save=["lm_head"])
    adapter = lora_fx.from_peft(copy.deepcopy(pm))[1]["default"]
    model = copy.deepcopy(base)
    compiled = torch.compile(model, backend=lora_fx.backend(adapter, mode="fold", inner="aot_eager", inplace=True))
    ids = example_ids()
    loss = _loss(compiled, ids)
    with torch.no_grad():
        torch.testing.assert_close(loss, _loss(pm, ids), **TOL)
    with pytest.raises(GraphRewriteError, match="cannot train through this graph") as e:
        loss.backward()
    weights = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    assert [p.split(":")[0] for p in e.value.problems] == weights + ["lm_head.weight"]
    assert all("fold in place merges B A" in p for p in e.value.problems[:2])
    assert "modules_to_save" in e.value.problems[2]
    assert all(p.grad is None for p in model.parameters())


def _three_sgd_steps_side_by_side(model, pm, ours: dict, pairs: dict, ids) -> None:
    """Three SGD steps of ``model`` (parameters ``ours``) and PeftModel ``pm`` (each of ours paired
    with PEFT's in ``pairs``): losses and every gradient equal at each step."""
    opts = [torch.optim.SGD(ps, lr=0.5) for ps in (ours.values(), pairs.values())]
    for _ in range(3):
        for opt in opts:
            opt.zero_grad()
        loss, want = _loss(model, ids), _loss(pm, ids)
        loss.backward()
        want.backward()
        torch.testing.assert_close(loss, want, **TOL)
        torch.testing.assert_close({n: p.grad for n, p in ours.items()}, {n: p.grad for n, p in pairs.items()}, **TOL)
        for opt in opts:
            opt.step()


PEFT_NAMES = {"lora_fx_A": "lora_A.default.weight", "lora_fx_B": "lora_B.default.weight",
              "lora_fx_B_bias": "lora_B.default.bias", "lora_fx_magnitude": "lora_magnitude_vector.default.weight"}


@pytest.mark.parametrize("variant", ["lora_bias", "dora"])
def test_for_training_trains_lora_bias_and_dora_magnitude_as_peft(tmp_path, variant):
    """lora_B's bias (lora_bias) and DoRA's magnitude are parameters of their modules, trained as
    PEFT trains them (qwen2: v_proj has a base bias, o_proj none): three SGD steps give PEFT's
    losses and gradients at 1e-5; the saved adapter reloads in PEFT with the trained values."""
    base = tiny_model("qwen2")
    pm = _peft(base, target_modules=["v_proj", "o_proj"], **{"use_dora" if variant == "dora" else "lora_bias": True})
    start = {k: v.clone() for k, v in peft.get_peft_model_state_dict(pm).items()}
    model = lora_fx.for_training(copy.deepcopy(base), lora_fx.from_peft(copy.deepcopy(pm))[1]["default"],
                                 inner="aot_eager")
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = dict(pm.named_parameters())
    pairs = {n: theirs["base_model.model." + n.rpartition(".")[0] + "." + PEFT_NAMES[n.rpartition(".")[2]]]
             for n in ours}
    extra = "lora_fx_B_bias" if variant == "lora_bias" else "lora_fx_magnitude"
    assert sum(n.endswith(extra) for n in ours) == 4
    assert set(pairs.values()) == {p for p in theirs.values() if p.requires_grad}  # every parameter PEFT trains
    ids = example_ids()
    _three_sgd_steps_side_by_side(model, pm, ours, pairs, ids)
    trained = model.lora_fx_backend.trained_adapter().state_dict()
    torch.testing.assert_close(trained, peft.get_peft_model_state_dict(pm), **TOL)
    moved = [k for k in trained if "lora_B.bias" in k or "magnitude" in k]
    assert len(moved) == 4 and all((trained[k] - start[k]).abs().max() > 1e-3 for k in moved)
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close({k: v for k, v in peft.get_peft_model_state_dict(loaded).items() if k in moved},
                               {k: trained[k] for k in moved}, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_training_summed_adapters_that_each_carry_a_lora_bias_is_refused():
    """Summed adapters' biases reach the graph as one sum, and mixed batches read them (and DoRA's
    magnitudes) as derived tensors: neither trains as PEFT trains each adapter's own, so
    as_peft=True is refused by name (A and B alone still train)."""
    model = tiny_model("qwen2")
    ads = [lora_fx.loading.random_adapter(model, lora_fx.LoraConfig(r=2, target_modules=targets, lora_bias=True),
                                          seed=seed) for seed, targets in enumerate((["v_proj"], ["v_proj", "o_proj"]))]
    be = lora_fx.backend(ads, mode="branch", inner="aot_eager")
    with pytest.raises(lora_fx.AdapterConfigError, match="cannot train these adapters as PEFT would") as e:
        be.parameters(as_peft=True)
    assert e.value.problems == [f"model.layers.{i}.self_attn.v_proj: 2 summed adapters carry a lora_B bias; lora_fx "
                                "trains one per module" for i in range(2)]
    assert len(be.parameters()) == 4 * 2
    mixed = lora_fx.backend({"a": ads[0], "b": ads[1]}, mode="branch", inner="aot_eager")
    with pytest.raises(lora_fx.AdapterConfigError, match="o_proj: mixed-adapter batches apply its lora_B bias"):
        mixed.parameters(as_peft=True)


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_for_training_trains_modules_to_save_copies_as_peft(tmp_path, saved):
    """A modules_to_save copy is a parameter of its module (lora_fx_saved_weight) that the graph
    reads in place of the module's weight while the adapter is on, the model's own under
    disabled(): three SGD steps give PEFT's losses and gradients (A, B and the copy) at 1e-5; the
    saved adapter reloads in PEFT with the trained copy and gives the trained model's logits."""
    base = tiny_model("llama")  # lm_head not tied to embed_tokens
    pm = _peft(base, target_modules=["q_proj", "v_proj"], modules_to_save=[saved])
    path = "lm_head.weight" if saved == "lm_head" else "model.embed_tokens.weight"
    start = pm.get_parameter(f"base_model.model.{path.rpartition('.')[0]}.modules_to_save.default.weight").clone()
    model = lora_fx.for_training(copy.deepcopy(base), lora_fx.from_peft(copy.deepcopy(pm))[1]["default"],
                                 inner="aot_eager")
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = dict(pm.named_parameters())
    names = {**PEFT_NAMES, "lora_fx_saved_weight": "modules_to_save.default.weight"}
    pairs = {n: theirs["base_model.model." + n.rpartition(".")[0] + "." + names[n.rpartition(".")[2]]] for n in ours}
    assert f"{path.rpartition('.')[0]}.lora_fx_saved_weight" in ours
    assert set(pairs.values()) == {p for p in theirs.values() if p.requires_grad}  # every parameter PEFT trains
    ids = example_ids()
    _three_sgd_steps_side_by_side(model, pm, ours, pairs, ids)
    copied = model.get_parameter(f"{path.rpartition('.')[0]}.lora_fx_saved_weight")
    assert (copied - start).abs().max() > 1e-3
    with torch.no_grad(), model.lora_fx_backend.disabled(), pm.disable_adapter():  # the model's own weight
        torch.testing.assert_close(model(input_ids=ids).logits, pm(input_ids=ids).logits, **TOL)
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(loaded.get_parameter(f"base_model.model.{path.rpartition('.')[0]}"
                                                    ".modules_to_save.default.weight"), copied.detach(), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
