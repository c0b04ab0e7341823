"""AOTInductor packages with a swappable adapter: built once here, run in a fresh Python process.

The fresh process checks the package against eager references computed here (lora_fx's reference,
PEFT's math): two sequence lengths through one dynamic-shape package, a swap to a lower-rank
adapter on a subset of the modules, set_scale / disable, and swaps that must be refused (rank
above the budget, another dtype, a module the package lacks) leaving the previous adapter running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from cases import Case, example_ids, peft_adapter, tiny_model

import lora_fx

LENGTHS = (5, 13)
ADAPTERS = {"first": dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8),
            "second": dict(target_modules=["q_proj"], r=2, lora_alpha=3),
            "big": dict(target_modules=["q_proj"], r=8),
            "other": dict(target_modules=["k_proj"], r=2)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("package")
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        peft_adapter(Case(name, "llama", kw), str(d / name), seed=i + 1)
    first = lora_fx.load_adapter(str(d / "first"))
    seq = torch.export.Dim("seq", min=2, max=64)
    for mode in ("branch", "fold"):
        lora_fx.export(tiny_model("llama"), (), first, kwargs={"input_ids": example_ids(1, 8), "use_cache": False},
                       dynamic_shapes={"input_ids": {1: seq}, "use_cache": None}, mode=mode,
                       path=str(d / f"{mode}.pt2"))
    refs = {}
    with torch.no_grad():
        for n in LENGTHS:
            ids = example_ids(1, n, seed=n)
            refs[f"base-{n}"] = tiny_model("llama")(input_ids=ids).logits
            for name in ("first", "second"):
                ad = lora_fx.load_adapter(str(d / name))
                refs[f"{name}-{n}"] = lora_fx.lora_forward(tiny_model("llama"), ad, input_ids=ids).logits
                half = lora_fx.lora_forward(tiny_model("llama"), ad.scaled(0.5), input_ids=ids)
                refs[f"{name}-half-{n}"] = half.logits
    assert (refs["first-5"] - refs["base-5"]).abs().max() > 1e-2
    torch.save(refs, d / "refs.pt")
    return d


FRESH = textwrap.dedent("""
    import json, sys, torch
    import lora_fx
    from cases import example_ids
    d, mode = sys.argv[1], sys.argv[2]
    refs = torch.load(f"{d}/refs.pt")
    pkg = lora_fx.load_package(f"{d}/{mode}.pt2", lora_fx.load_adapter(f"{d}/first"))
    out = {}

    def err(want_key):
        worst = 0.0
        for n in (5, 13):
            got = pkg(input_ids=example_ids(1, n, seed=n), use_cache=False)
            got = got if isinstance(got, torch.Tensor) else got[0]
            worst = max(worst, float((got - refs[f"{want_key}-{n}"]).abs().max()))
        return worst

    out["first"] = err("first")
    pkg.set_scale(0.5)
    out["first half"] = err("first-half")
    pkg.set_scale(1.0)
    pkg.disable()
    out["disabled"] = err("base")
    pkg.enable()
    pkg.swap(lora_fx.load_adapter(f"{d}/second"))
    out["second"] = err("second")
    for bad, kw in (("big", {}), ("second", {"dtype": torch.float16}), ("other", {})):
        try:
            pkg.swap(lora_fx.load_adapter(f"{d}/{bad}", **kw))
            out[f"refused {bad}"] = None
        except lora_fx.SwapError as e:
            out[f"refused {bad}"] = str(e)
        out[f"after {bad}"] = err("second")
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_package_in_a_fresh_process(built, mode):
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", FRESH, str(built), mode], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for key in ("first", "first half", "disabled", "second", "after big", "after second", "after other"):
        assert out[key] < 1e-4, (key, out[key])
    assert "rank 8: above the rank budget 4" in out["refused big"]
    assert "expected LoRA tensors in torch.float32, found torch.float16" in out["refused second"]
    assert "model.layers.0.self_attn.k_proj: not in the compiled graphs" in out["refused other"]


def test_export_refuses_what_a_swap_could_not_rebuild(tmp_path):
    model = tiny_model("llama")
    dora = lora_fx.init_adapter(model, lora_fx.LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(lora_fx.GraphRewriteError, match="q_proj: DoRA in a package is not supported"):
        lora_fx.export(model, (), dora, kwargs={"input_ids": example_ids(1, 4)}, path=str(tmp_path / "x.pt2"))


def test_cli_export_writes_a_package_that_runs(built, tmp_path, capsys):
    from lora_fx.cli import main

    tiny_model("llama").save_pretrained(str(tmp_path / "model"))
    out = str(tmp_path / "cli.pt2")
    assert main(["export", "--model", str(tmp_path / "model"), "--adapter", str(built / "first"), "--out", out,
                 "--mode", "fold", "--max-seq", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    refs = torch.load(built / "refs.pt")
    got = lora_fx.load_package(out)(input_ids=example_ids(1, 13, seed=13), use_cache=False)
    got = got if isinstance(got, torch.Tensor) else got[0]
    torch.testing.assert_close(got, refs["first-13"], atol=1e-4, rtol=1e-4)


def test_branch_package_of_a_conv_model_swaps(tmp_path):
    from test_peft_matrix import ConvNet

    from lora_fx.loading import random_adapter

    torch.manual_seed(0)
    model = ConvNet("conv", torch.nn.Conv2d(4, 6, 3, padding=1)).eval()
    first = random_adapter(model, lora_fx.LoraConfig(target_modules=["conv", "lin0"], r=4), seed=1)
    second = random_adapter(model, lora_fx.LoraConfig(target_modules=["conv"], r=2, lora_alpha=5), seed=2)
    x = torch.randn(2, 4, 6, 6)
    lora_fx.export(model, (x,), first, path=str(tmp_path / "conv.pt2"))
    pkg = lora_fx.load_package(str(tmp_path / "conv.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(pkg(x), lora_fx.lora_forward(model, first, x), atol=1e-4, rtol=1e-4)
        pkg.swap(second)
        want = lora_fx.lora_forward(model, second, x)
        assert (want - model(x)).abs().max() > 1e-3
        torch.testing.assert_close(pkg(x), want, atol=1e-4, rtol=1e-4)
