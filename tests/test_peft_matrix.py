"""PEFT's LoRA test matrix (the LoRA rows of ``TEST_CASES`` in PEFT's tests/test_custom_models.py),
run through lora_fx: PEFT's configs, our own small models of the same names.

Every case whose eval forward is LoRA must give PEFT's output at 1e-4 on the reference, fold and
branch paths (aot_eager; Inductor for a marked subset); the others are refused at load with an
error naming the field. Fold over a grouped conv runs its dense kernel (PEFT refuses to merge it).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_fx

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return torch.log_softmax(self.lin1(self.drop(self.lin0(x).relu())), dim=-1)


class EmbConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb, self.conv1d, self.lin0 = nn.Embedding(100, 5), Conv1D(1, 5), nn.Linear(10, 2)

    def forward(self, ids):
        return self.lin0(self.conv1d(self.emb(ids)).relu().flatten(1))


class ConvNet(nn.Module):
    """A conv (``name``) then a linear head lin0 on its channels (spatially averaged)."""

    def __init__(self, name: str, conv: nn.Module):
        super().__init__()
        self.name = name
        self.add_module(name, conv)
        self.lin0 = nn.Linear(conv.out_channels, 2)

    def forward(self, x):
        y = getattr(self, self.name)(x).relu()
        return self.lin0(y.flatten(2).mean(-1))


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(10, 2, batch_first=True), nn.Linear(10, 2)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x)[0].mean(1))


class ParamLinear(nn.Module):
    """A linear map written on a bare parameter (no nn.Linear): LoRA can only target the parameter."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight.T + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = ParamLinear(10, 20), nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(self.lin0(x).relu())


MODELS = {
    "MLP": (MLP, lambda g: torch.randn(3, 10, generator=g)),
    "EmbConv1D": (EmbConv1D, lambda g: torch.randint(0, 100, (3, 10), generator=g)),
    "Conv1d": (lambda: ConvNet("conv1d", nn.Conv1d(3, 6, 2)), lambda g: torch.randn(3, 3, 10, generator=g)),
    "Conv2d": (lambda: ConvNet("conv2d", nn.Conv2d(5, 10, 3)), lambda g: torch.randn(3, 5, 5, 5, generator=g)),
    "Conv2dGroups": (lambda: ConvNet("conv2d", nn.Conv2d(4, 8, 3, groups=4, padding=1)),
                     lambda g: torch.randn(3, 4, 5, 5, generator=g)),
    "Conv2dGroups2": (lambda: ConvNet("conv2d", nn.Conv2d(8, 8, 3, groups=2, stride=2, padding=1)),
                      lambda g: torch.randn(3, 8, 6, 6, generator=g)),
    "Conv3d": (lambda: ConvNet("conv3d", nn.Conv3d(5, 10, 3, padding=1)),
               lambda g: torch.randn(3, 5, 4, 4, 4, generator=g)),
    "Conv3d1x1": (lambda: ConvNet("conv3d", nn.Conv3d(5, 10, 1)), lambda g: torch.randn(3, 5, 3, 3, 3, generator=g)),
    "MHA": (MHA, lambda g: torch.randn(3, 4, 10, generator=g)),
    "MlpUsingParameters": (MlpUsingParameters, lambda g: torch.randn(3, 10, generator=g)),
}


def _variants() -> dict:
    from peft import KasaConfig, MontecloraConfig, VeloraConfig
    from peft.tuners.lora.config import BdLoraConfig

    return {"bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
            "velora_random": VeloraConfig(num_groups=2, init_type="random"),
            "velora_avg": VeloraConfig(num_groups=2, init_type="batch_average"),
            "velora_once": VeloraConfig(num_groups=2, init_type="batch_average_once"),
            "monteclora": MontecloraConfig(num_samples=2), "kasa": KasaConfig()}


# (PEFT's case name, model, PEFT's LoraConfig kwargs; a string names a variant config above)
MATRIX = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    ("Vanilla MLP 1 LoRA with KaSA", "MLP", {"target_modules": ["lin0"], "kasa_config": "kasa", "r": 4}),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    ("Vanilla MLP 10 LoRA with VeLoRA random", "MLP", {"target_modules": ["lin0"], "velora_config": "velora_random"}),
    ("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP",
     {"target_modules": ["lin0", "lin1"], "velora_config": "velora_avg"}),
    ("Vanilla MLP 12 LoRA with VeLoRA batch_average_once", "MLP",
     {"target_modules": ["lin0"], "velora_config": "velora_once"}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D",
     {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    ("Conv3d 1x1 LoRA", "Conv3d1x1", {"target_modules": ["conv3d"]}),
    ("Conv3d 1x1 LoRA with DoRA", "Conv3d1x1", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True,
                                                    "lora_alpha": 32}),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    ("MLP 2 using nn.Parameter LoRA", "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    ("Vanilla MLP 1 LoRA with Monteclora", "MLP", {"target_modules": ["lin0"], "monteclora_config": "monteclora"}),
]
IDS = [name for name, _, _ in MATRIX]

# cases refused at load, with the field the error names (their eval forward is not LoRA on the
# given base: KaSA truncates the base weight's spectrum; trainable tokens replace embedding rows)
REFUSED = {"Vanilla MLP 1 LoRA with KaSA": "kasa_config",
           "Embedding + transformers Conv1D 1 LoRA trainable_tokens": "trainable_token_indices"}
# variants applied for inference whose training differs: be.parameters() names the field
INFERENCE_ONLY = {"Vanilla MLP 1 LoRA with MiCA": "init_lora_weights",
                  "Vanilla MLP 10 LoRA with VeLoRA random": "velora_config",
                  "Vanilla MLP 11 LoRA with VeLoRA batch_average": "velora_config",
                  "Vanilla MLP 12 LoRA with VeLoRA batch_average_once": "velora_config",
                  "Vanilla MLP 1 LoRA with Monteclora": "monteclora_config"}
INDUCTOR = {"Conv2d 2 LoRA with DoRA", "Conv3d 1 LoRA with lora_b bias", "Conv2d Groups2 LoRA",
            "Embedding + transformers Conv1D 3 DoRA", "MHA 2 LoRA", "MLP 1 using nn.Parameter LoRA"}


def peft_case(model_name: str, kwargs: dict, directory: str, seed: int = 0):
    """(base model, PEFT model in eval with non-trivial adapter values, example input); the
    adapter is saved to ``directory``. VeLoRA / MonteCLoRA run one training step first, as their
    state is set up there."""
    make, example = MODELS[model_name]
    torch.manual_seed(0)  # one base model per model name; the adapter's values follow ``seed``
    base = make().eval()
    torch.manual_seed(seed)
    variants = _variants()
    kw = {"init_lora_weights": False, **{k: variants.get(v, v) if isinstance(v, str) and k != "init_lora_weights"
                                         else v for k, v in kwargs.items()}}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    gen = torch.Generator().manual_seed(seed + 1)
    x = example(gen)
    if "velora_config" in kw or "monteclora_config" in kw:
        pm.train()
        out = pm(x)
        out.float().sum().backward()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "lora_" in name:
                if "magnitude" in name:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
                else:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.requires_grad:  # modules_to_save copies
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    pm.eval()
    pm.save_pretrained(directory)
    return base, pm, x


def _compiled(base: nn.Module, adapter, mode: str, inner: str) -> nn.Module:
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    return torch.compile(model, backend=lora_fx.backend(adapter, mode=mode, inner=inner), fullgraph=True)


@pytest.mark.parametrize("name,model_name,kwargs", [
    pytest.param(*case, id=case[0], marks=[pytest.mark.inductor] if case[0] in INDUCTOR else []) for case in MATRIX])
def test_peft_matrix_case(tmp_path, name, model_name, kwargs):
    if name in REFUSED:
        with pytest.raises(lora_fx.LoraFxError, match=REFUSED[name]):
            peft_case(model_name, kwargs, str(tmp_path))
            lora_fx.load_adapter(str(tmp_path))
        return
    base, pm, x = peft_case(model_name, kwargs, str(tmp_path))
    adapter = lora_fx.load_adapter(str(tmp_path))
    with torch.no_grad():
        want, plain = pm(x), base(x)
        assert (want - plain).abs().max() > 1e-3, "the adapter must change the output"
        got = lora_fx.lora_forward(base, adapter, x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    inner = "inductor" if name in INDUCTOR else "aot_eager"
    for mode in ("branch", "fold"):  # fold of a grouped conv: its dense kernel (PEFT cannot merge it)
        with torch.no_grad():
            torch.testing.assert_close(_compiled(base, adapter, mode, inner)(x), want, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, mode=mode: f"{mode}: {m}")
    if name in INFERENCE_ONLY:
        be = lora_fx.backend(adapter, mode="branch")
        with pytest.raises(lora_fx.AdapterConfigError, match=INFERENCE_ONLY[name]):
            be.parameters()


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_bd_lora_block_diagonal_factors_match_peft(tmp_path, mode):
    # not in PEFT's matrix: BD-LoRA's eval forward is LoRA with block-diagonal A (lin0) and B (lin1)
    base, pm, x = peft_case("MLP", {"target_modules": ["lin0", "lin1"], "use_bdlora": "bdlora"}, str(tmp_path))
    adapter = lora_fx.load_adapter(str(tmp_path))
    assert adapter.modules["lin0"].lora_a.shape == (8, 10) and adapter.modules["lin1"].lora_b.shape == (2, 8)
    with torch.no_grad():
        want = pm(x)
        assert (want - base(x)).abs().max() > 1e-3
        torch.testing.assert_close(lora_fx.lora_forward(base, adapter, x), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(_compiled(base, adapter, mode, "aot_eager")(x), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(lora_fx.AdapterConfigError, match="use_bdlora"):
        lora_fx.backend(adapter, mode="branch").parameters()


def test_matrix_count():
    """The README's figure: how many of PEFT's LoRA cases lora_fx runs (the rest refused by name)."""
    assert len(MATRIX) == 45
    assert len(MATRIX) - len(REFUSED) == 43
