"""lora_fx.for_training as transformers.Trainer's model, against Trainer over peft.get_peft_model."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import lora_fx
import lora_fx.eager
from tests.cases import VOCAB, tiny_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _dataset(n: int = 8, length: int = 10) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, length), generator=gen)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def _train(model: torch.nn.Module, out: str, resume: str | None = None, **kwargs) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=out, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_steps=5,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.25, logging_steps=1,
        save_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, **kwargs)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _logged(trainer: transformers.Trainer, key: str) -> list[float]:
    return [e[key] for e in trainer.state.log_history if key in e and "train_runtime" not in e]


def assert_logs_as_peft(ours: transformers.Trainer, theirs: transformers.Trainer) -> None:
    """Five logged steps whose losses and grad norms equal PEFT's at 1e-5, one of them clipped."""
    assert len(_logged(ours, "loss")) == 5
    torch.testing.assert_close(_logged(ours, "loss"), _logged(theirs, "loss"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logged(ours, "grad_norm"), _logged(theirs, "grad_norm"), rtol=1e-5, atol=1e-5)
    assert max(_logged(ours, "grad_norm")) > 0.25  # max_grad_norm=0.25 clipped at least one step


def _peft_state(pm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(pm).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """PEFT and lora_fx trained by Trainer from the same base and the same (random) adapter."""
    base = tiny_model("llama")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    start = _peft_state(pm)
    adapter = lora_fx.from_peft(copy.deepcopy(pm))[1]["default"]
    peft_trainer = _train(pm, str(tmp_path_factory.mktemp("peft")))
    model = lora_fx.for_training(copy.deepcopy(base), copy.deepcopy(adapter), inner="aot_eager")
    out = tmp_path_factory.mktemp("lora_fx")
    trainer = _train(model, str(out))
    return dict(base=base, pm=pm, start=start, adapter=adapter, peft=peft_trainer, model=model, trainer=trainer,
                out=out)


def test_trainer_logs_the_losses_and_grad_norms_of_peft(runs):
    assert_logs_as_peft(runs["trainer"], runs["peft"])


def test_trainer_trains_only_the_adapter_as_peft_does(runs):
    model, be = runs["model"], runs["model"].lora_fx_backend
    trained = {k: v for k, v in model.state_dict().items() if "lora_fx_" not in k}
    base = runs["base"].state_dict()
    assert trained.keys() == base.keys()
    assert all(torch.equal(trained[k], base[k]) for k in base)  # bitwise unchanged
    ours, theirs = be.trained_adapter().state_dict(), _peft_state(runs["pm"])
    assert ours.keys() == theirs.keys()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert all(not torch.allclose(ours[k], runs["start"][k]) for k in ours)  # every A and B moved
    assert be.reports and be.unseen_modules() == []  # Trainer's calls ran the compiled graphs
    optimizer = runs["trainer"].optimizer
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in be.parameters()}


def test_checkpoint_loads_with_peft_model_from_pretrained(runs):
    model, ckpt = runs["model"], runs["out"] / "checkpoint-5"
    assert json.loads((ckpt / "adapter_config.json").read_text())["target_modules"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(runs["base"]), str(ckpt)).eval()
    ids = _dataset(2)[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=1e-4, atol=1e-4)


def test_resume_from_checkpoint_reaches_the_same_adapter(runs, tmp_path):
    model = lora_fx.for_training(copy.deepcopy(runs["base"]), copy.deepcopy(runs["adapter"]), inner="aot_eager")
    trainer = _train(model, str(tmp_path), resume=str(runs["out"] / "checkpoint-3"))
    assert trainer.state.global_step == 5
    torch.testing.assert_close(model.lora_fx_backend.trained_adapter().state_dict(),
                               runs["model"].lora_fx_backend.trained_adapter().state_dict(), rtol=1e-6, atol=1e-6)


def test_for_training_returns_the_frozen_model_with_a_peft_saving_save_pretrained(tmp_path):
    base = tiny_model("llama")
    model = lora_fx.for_training(base, peft.LoraConfig(r=2, target_modules=["q_proj"]), inner="aot_eager")
    assert model is base and type(model) is transformers.LlamaForCausalLM
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"model.layers.{i}.self_attn.q_proj.lora_fx_{ab}" for i in range(2) for ab in "AB"]
    model.save_pretrained(str(tmp_path), state_dict=None, safe_serialization=True, max_shard_size="5GB")
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    ids = _dataset(1)[0]["input_ids"][None]
    with torch.no_grad():  # B is zero, as PEFT initialises it: both equal the base model
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits)
    model.save_pretrained(str(tmp_path / "other"), is_main_process=False)
    assert not (tmp_path / "other").exists()
    with pytest.raises(lora_fx.AdapterConfigError, match="LlamaForCausalLM: expected a model for_training has not"):
        lora_fx.for_training(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))


def test_for_training_initialises_a_lora_fx_config_as_peft():
    config = lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"])
    model = lora_fx.for_training(tiny_model("llama"), config, inner="aot_eager")
    w = model.lora_fx_backend.trained_adapter().modules["model.layers.0.self_attn.v_proj"]
    assert w.lora_a.abs().sum() > 0 and torch.count_nonzero(w.lora_b) == 0


def test_for_training_refuses_what_it_does_not_train_yet():
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, modules_to_save=["lm_head"],
                             bias="all", lora_dropout=0.1)
    model = tiny_model("llama")
    with pytest.raises(lora_fx.AdapterConfigError, match="not trained yet") as e:
        lora_fx.for_training(model, config, inner="aot_eager")
    assert [p.split(":")[0] for p in e.value.problems] == ["bias"]  # modules_to_save trains (test_trained_parameters)
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    q = "model.layers.0.self_attn.q_proj"
    head = lora_fx.init_adapter(model, lora_fx.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(lora_fx.AdapterConfigError, match="has no copy in the adapter"):
        lora_fx.for_training(model, head)  # an Adapter without the copies PEFT would train
    both = dataclasses.replace(head, config=dataclasses.replace(head.config, modules_to_save=["q_proj"]),
                               overrides={f"{q}.weight": model.get_parameter(f"{q}.weight").detach().clone()})
    with pytest.raises(lora_fx.AdapterConfigError, match="copy of a module LoRA also targets") as e:
        lora_fx.for_training(model, both)
    assert e.value.problems[0].startswith(f"modules_to_save: {q}.weight is the copy of a module LoRA also targets")
    adapter = lora_fx.init_adapter(model, lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
    saved_head = dataclasses.replace(adapter, overrides={"lm_head.weight": model.lm_head.weight.detach().clone()})
    with pytest.raises(lora_fx.AdapterConfigError, match=r"overrides: the adapter replaces \['lm_head.weight'\]"):
        lora_fx.for_training(model, saved_head)
    with pytest.raises(lora_fx.AdapterConfigError, match="mode: expected 'branch'"):
        lora_fx.for_training(model, lora_fx.LoraConfig(r=2, target_modules=["q_proj"]), mode="fold")


def test_for_training_refuses_a_peft_initialisation_it_cannot_reproduce():
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian")
    with pytest.raises(lora_fx.AdapterConfigError, match="init_lora_weights: expected True"):
        lora_fx.for_training(tiny_model("llama"), config)
    with pytest.raises(TypeError, match="adapter_or_config"):
        lora_fx.for_training(tiny_model("llama"), {"r": 2})


@pytest.fixture
def eager_calls(monkeypatch) -> list[str]:
    """Targeted modules that ran outside the compiled graphs (the eager guard's slow exact fallback)."""
    calls, original = [], lora_fx.eager.eager_update
    monkeypatch.setattr(lora_fx.eager, "eager_update", lambda m, *a: calls.append(type(m).__name__) or original(m, *a))
    return calls


def test_gradient_checkpointing_trains_as_peft(runs, tmp_path, eager_calls):
    """TrainingArguments(gradient_checkpointing=True): transformers checkpoints each layer (each
    becomes a subgraph of the compiled graph) and hooks the embeddings' output to require grad."""
    pm = peft.get_peft_model(copy.deepcopy(runs["base"]), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    peft.set_peft_model_state_dict(pm, runs["start"])
    theirs = _train(pm, str(tmp_path / "peft"), gradient_checkpointing=True)
    model = lora_fx.for_training(copy.deepcopy(runs["base"]), copy.deepcopy(runs["adapter"]), inner="aot_eager")
    ours = _train(model, str(tmp_path / "lora_fx"), gradient_checkpointing=True)
    assert model.is_activation_checkpointing and not getattr(model, "_hf_peft_config_loaded", False)
    torch.testing.assert_close(_logged(ours, "loss"), _logged(theirs, "loss"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logged(ours, "grad_norm"), _logged(theirs, "grad_norm"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logged(ours, "loss"), _logged(runs["trainer"], "loss"), rtol=1e-5, atol=1e-5)
    assert eager_calls == []


def _nf4_llama(directory) -> torch.nn.Module:
    """A tiny Llama loaded 4-bit (NF4, fp32 compute, CPU) by transformers, as QLoRA bases are loaded."""
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), quantization_config=qc, device_map="cpu",
                                                             dtype=torch.float32).train()


def test_qlora_over_a_bitsandbytes_4bit_base_trains_as_peft(tmp_path, eager_calls):
    """for_training over a 4-bit base passes Trainer's refusal of a purely quantized model (it marks
    the model as carrying adapters) and hooks the embeddings' output to require grad (the graph then
    traces bitsandbytes' differentiable path), as PEFT trains it. Both run bitsandbytes' own 4-bit
    matmul over the same packed weights, training before any inference call (the repack trap):
    compared at 1e-5, as the dense runs."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(  # 64 wide: bitsandbytes' 64-element blocks
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(tmp_path / "dense")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                             init_lora_weights=False, lora_dropout=0.0)
    pm = peft.get_peft_model(_nf4_llama(tmp_path / "dense"), config)
    pm.save_pretrained(str(tmp_path / "start"))
    theirs = _train(pm, str(tmp_path / "peft"))
    model = lora_fx.for_training(_nf4_llama(tmp_path / "dense"), lora_fx.load_adapter(str(tmp_path / "start")),
                                 inner="aot_eager")
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, bnb.nn.Params4bit)
    assert model.is_quantized and model._hf_peft_config_loaded
    ours = _train(model, str(tmp_path / "lora_fx"))
    torch.testing.assert_close(_logged(ours, "loss"), _logged(theirs, "loss"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logged(ours, "grad_norm"), _logged(theirs, "grad_norm"), rtol=1e-5, atol=1e-5)
    trained = model.lora_fx_backend.trained_adapter().state_dict()
    torch.testing.assert_close(trained, _peft_state(pm), rtol=1e-5, atol=1e-5)
    assert eager_calls == []
    loaded = peft.PeftModel.from_pretrained(_nf4_llama(tmp_path / "dense"), str(tmp_path / "lora_fx" / "checkpoint-5"))
    ids = _dataset(1)[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, loaded.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_for_training_copies_modules_to_save_as_peft_does():
    """From a config, each module modules_to_save names gets PEFT's fresh copy (the module's own
    weight) as a trainable parameter of its module; the model's weight stays frozen."""
    model = tiny_model("llama")
    lora_fx.for_training(model, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                         inner="aot_eager")
    copy_ = model.lm_head.lora_fx_saved_weight
    assert copy_.requires_grad and not model.lm_head.weight.requires_grad
    torch.testing.assert_close(copy_.detach(), model.lm_head.weight, atol=0, rtol=0)
    assert any(p is copy_ for p in model.lora_fx_backend.parameters(as_peft=True))
