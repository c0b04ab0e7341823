"""lora_fx.for_training as the model of TRL's SFTTrainer, against SFTTrainer over PEFT (peft_config=).

SFTTrainer replaces ``model.forward`` with its fused-loss head (``add_fused_lm_head``: the backbone,
then log-probabilities in chunks, no full logits) after the model is built; for_training compiles
``model.__call__``, which reads ``self.forward`` at each call, so the compiled graphs run TRL's
forward. Everything runs offline: a word-level tokenizer built here, a dataset of plain text.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lora_fx
import lora_fx.eager
from tests.cases import VOCAB, tiny_model
from tests.test_finetune import _logged, assert_logs_as_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TARGETS = ["q_proj", "v_proj", "down_proj"]
WORDS = ["<unk>", "<pad>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 3)]


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny model's vocabulary, built in memory (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="<eos>")


def texts(n: int = 8, words: int = 9) -> datasets.Dataset:
    """Plain-text examples of one length (one compiled shape); SFTTrainer tokenizes them and adds EOS."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (n, words), generator=gen)
    return datasets.Dataset.from_dict({"text": [" ".join(WORDS[i] for i in row.tolist()) for row in ids]})


def sft(model: torch.nn.Module, out: str, peft_config=None) -> trl.SFTTrainer:
    """SFTTrainer with its default collator and loss. bf16=False: SFTConfig's default is bf16 autocast,
    where lora_fx's branch (scale on the rank side, one fused add) rounds in another order than PEFT."""
    args = trl.SFTConfig(
        output_dir=out, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_steps=5,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.25, logging_steps=1,
        save_steps=5, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, bf16=False,
        gradient_checkpointing=True)  # SFTConfig's default, spelled out: Trainer's checkpointing path
    return trl.SFTTrainer(model=model, args=args, train_dataset=texts(), processing_class=tokenizer(),
                          peft_config=peft_config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFTTrainer over PEFT (its own get_peft_model) and over for_training from the same adapter."""
    base = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    theirs = sft(copy.deepcopy(base), str(tmp_path_factory.mktemp("peft")), peft_config=config)
    adapter = lora_fx.from_peft(copy.deepcopy(theirs.model))[1]["default"]  # the adapter PEFT starts from
    theirs.train()
    model = lora_fx.for_training(copy.deepcopy(base), adapter, inner="aot_eager")
    out = tmp_path_factory.mktemp("lora_fx")
    ours = sft(model, str(out))
    eager_calls = []
    original = lora_fx.eager.eager_update
    lora_fx.eager.eager_update = lambda *a, **k: eager_calls.append(1) or original(*a, **k)
    try:
        ours.train()
    finally:
        lora_fx.eager.eager_update = original
    return dict(base=base, peft=theirs, model=model, trainer=ours, out=out, eager_calls=eager_calls)


def test_sft_trainer_logs_the_losses_and_grad_norms_of_peft(runs):
    ours, theirs = runs["trainer"], runs["peft"]
    assert_logs_as_peft(ours, theirs)
    torch.testing.assert_close(_logged(ours, "mean_token_accuracy"), _logged(theirs, "mean_token_accuracy"))


def test_trl_s_fused_forward_runs_in_the_compiled_graphs(runs):
    model, be = runs["model"], runs["model"].lora_fx_backend
    assert "forward" in vars(model)  # TRL's fused-loss head replaced the forward on the instance
    assert model.is_activation_checkpointing
    assert be.reports and be.unseen_modules() == []
    assert runs["eager_calls"] == []  # no targeted module ran outside the graphs (the slow eager fallback)


def test_sft_checkpoint_holds_peft_s_adapter_and_loads_with_peft_model_from_pretrained(runs):
    ckpt = runs["out"] / "checkpoint-5"
    ours = runs["model"].lora_fx_backend.trained_adapter().state_dict()
    theirs = peft.get_peft_model_state_dict(runs["peft"].model)
    assert ours.keys() == theirs.keys()
    torch.testing.assert_close(ours, {k: v.detach() for k, v in theirs.items()}, rtol=1e-5, atol=1e-5)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(runs["base"]), str(ckpt)).eval()
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    model = runs["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
