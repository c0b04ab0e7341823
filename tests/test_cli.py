"""The lora-fx command and the generation example, run as a user runs them."""

import os
import subprocess
import sys

import peft
import pytest
import torch
from cases import CASES, example_ids, logits, peft_adapter, tiny_model

import lora_fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_fx_cli(*args):
    return subprocess.run([sys.executable, "-m", "lora_fx", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    case = next(c for c in CASES if c.name == "llama_dora")
    base, pm = peft_adapter(case, str(d / "adapter"))
    base.save_pretrained(str(d / "model"))
    with torch.no_grad():
        want = logits(pm, example_ids())
    return d, want


def test_inspect_lists_the_targeted_modules(model_and_adapter):
    d, _ = model_and_adapter
    r = lora_fx_cli("inspect", str(d / "adapter"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    rows = [line.split()[0] for line in lines if line.startswith("model.")]
    assert sorted(rows) == sorted(f"model.layers.{i}.{m}" for i in (0, 1)
                                  for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert "DoRA" in r.stdout and "6 modules" in r.stdout


def test_inspect_against_a_model_reports_problems(model_and_adapter, tmp_path):
    d, _ = model_and_adapter
    r = lora_fx_cli("inspect", str(d / "adapter"), "--model", str(d / "model"))
    assert r.returncode == 0 and "matches 6 modules" in r.stdout
    small = tiny_model("llama", layers=1)
    small.save_pretrained(str(tmp_path / "small"))
    r = lora_fx_cli("inspect", str(d / "adapter"), "--model", str(tmp_path / "small"))
    assert r.returncode == 1
    assert "model.layers.1.self_attn.q_proj: adapter has LoRA tensors for it, the model has no such module" in r.stdout


def test_merge_gives_peft_merged_logits(model_and_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    d, want = model_and_adapter
    r = lora_fx_cli("merge", "--model", str(d / "model"), "--adapter", str(d / "adapter"), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, example_ids()), want, atol=1e-4, rtol=1e-4)
    pm = peft.PeftModel.from_pretrained(tiny_model("llama"), str(d / "adapter")).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, example_ids()), logits(pm, example_ids()), atol=1e-4, rtol=1e-4)


def test_errors_are_one_line_with_status_2(tmp_path):
    r = lora_fx_cli("inspect", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("lora-fx: error:")
    (tmp_path / "adapter_config.json").write_text('{"r": "x"}')
    r = lora_fx_cli("inspect", str(tmp_path))
    assert r.returncode == 2 and "r: expected a positive int" in r.stderr and "Traceback" not in r.stderr
    r = lora_fx_cli("--debug", "inspect", str(tmp_path))
    assert "Traceback" in r.stderr


def test_generate_demo_runs_in_reduced_mode(tmp_path):
    r = subprocess.run([sys.executable, "examples/generate.py", "--base-steps", "30", "--lora-steps", "20",
                        "--max-new-tokens", "8", "--inner", "aot_eager", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "with the adapter (fold)" in r.stdout
    for name in ("eager, PEFT-style hooks", "lora_fx fold", "lora_fx branch"):
        assert name in r.stdout and "tokens/s" in r.stdout
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
    peft.PeftConfig.from_pretrained(str(tmp_path))  # PEFT reads what the demo saved


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_generate_demo_over_a_quantized_base(tmp_path, quantize):
    pytest.importorskip("bitsandbytes" if quantize == "nf4" else "torchao")
    r = subprocess.run([sys.executable, "examples/generate.py", "--base-steps", "20", "--lora-steps", "10",
                        "--max-new-tokens", "6", "--inner", "aot_eager", "--quantize", quantize,
                        "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    fmt = "bitsandbytes nf4 (Params4bit)" if quantize == "nf4" else "torchao Int8Tensor"
    assert f"base model quantized: {fmt}" in r.stdout
    assert "with the adapter (branch)" in r.stdout and "lora_fx branch" in r.stdout
    peft.PeftConfig.from_pretrained(str(tmp_path))


def test_inspect_reports_the_base_models_quantization(tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers as tf
    from test_quantized import dense_llama

    dense, quant = tmp_path / "dense", tmp_path / "nf4"
    dense_llama().save_pretrained(dense)
    qc = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    tf.AutoModelForCausalLM.from_pretrained(dense, quantization_config=qc, device_map="cpu").save_pretrained(quant)
    model = tf.AutoModelForCausalLM.from_pretrained(dense)
    lora_fx.init_adapter(model, lora_fx.LoraConfig(r=2, target_modules=["q_proj"])).save(tmp_path / "ad")
    r = lora_fx_cli("inspect", str(tmp_path / "ad"), "--model", str(quant))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "base weights: bitsandbytes nf4 (Params4bit): 14 modules" in r.stdout
    assert "(quantized: branch mode only)" in r.stdout
    assert "model.layers.0.self_attn.q_proj  [bitsandbytes nf4 (Params4bit)]" in r.stdout
    r = lora_fx_cli("inspect", str(tmp_path / "ad"), "--model", str(dense))
    assert "base weights: dense torch.float32: 16 modules" in r.stdout and "quantized" not in r.stdout


def test_a_path_typo_is_no_such_directory_not_a_hub_download(model_and_adapter):
    d, _ = model_and_adapter
    r = lora_fx_cli("inspect", "./nope")  # spelled as a path: never a repo id
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("lora-fx: error: no such directory: ./nope") and "huggingface-cli" not in r.stderr
    r = lora_fx_cli("inspect", "tests/nope")  # owner/name, and tests/ is a local directory: both places named
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("lora-fx: error: no such directory: tests/nope")
    assert f"not found locally at {os.path.join(ROOT, 'tests', 'nope')}, nor in the hub cache as repo id tests/nope" \
        in r.stderr
    r = lora_fx_cli("merge", "--model", "tests/nope", "--adapter", str(d / "adapter"), "--out", str(d / "x"))
    assert r.returncode == 2 and "lora-fx: error: no such directory: tests/nope" in r.stderr, r.stderr
    r = lora_fx_cli("inspect", os.path.join(ROOT, "README.md"))
    assert r.returncode == 2 and "README.md: expected a PEFT adapter directory, found a file" in r.stderr


def test_merge_warns_only_on_another_base_model_in_one_line(tmp_path):
    tiny_model("llama").save_pretrained(str(tmp_path / "tiny-llama"))
    for name in ("acme/tiny-llama", "acme/other-model"):
        config = lora_fx.LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=name)
        lora_fx.init_adapter(tiny_model("llama"), config).save(tmp_path / f"on-{name.split('/')[1]}")
    r = lora_fx_cli("merge", "--model", str(tmp_path / "tiny-llama"), "--adapter", str(tmp_path / "on-tiny-llama"),
                    "--out", str(tmp_path / "a"))
    assert r.returncode == 0 and "trained on" not in r.stderr, r.stderr  # a hub id and its local copy: one model
    r = lora_fx_cli("merge", "--model", str(tmp_path / "tiny-llama"), "--adapter", str(tmp_path / "on-other-model"),
                    "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "trained on" in line]
    assert lines == [f"lora-fx: warning: adapter was trained on 'acme/other-model', the model is "
                     f"'{tmp_path / 'tiny-llama'}'"], r.stderr
    assert "UserWarning" not in r.stderr and ".check(model)" not in r.stderr


@pytest.mark.parametrize(("trained_on", "loaded_from", "same"), [
    ("acme/tiny-llama", "/models/tiny-llama/", True),
    ("acme/tiny-llama", "/hf/hub/models--acme--tiny-llama/snapshots/0123abc", True),
    ("./ckpt/base", "ckpt/base", True),
    ("acme/tiny-llama", "/models/other-model", False),
])
def test_same_base_model_reads_hub_ids_and_local_paths(trained_on, loaded_from, same):
    from lora_fx.checks import same_base_model

    assert same_base_model(trained_on, loaded_from) is same


def test_exported_package_refuses_a_sequence_above_max_seq(tmp_path, capsys):
    from lora_fx.cli import main

    model = tiny_model("llama")
    model.save_pretrained(str(tmp_path / "model"))
    lora_fx.init_adapter(model, lora_fx.LoraConfig(r=2, target_modules=["q_proj"])).save(tmp_path / "adapter")
    out = str(tmp_path / "p.pt2")
    assert main(["export", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--out", out,
                 "--max-seq", "16"]) == 0
    assert "sequence length 2..16" in capsys.readouterr().out
    pkg = lora_fx.load_package(out)
    got = pkg(input_ids=example_ids(1, 16), use_cache=False)
    with torch.no_grad():
        want = model(input_ids=example_ids(1, 16)).logits  # B is zero: the base model's logits
    torch.testing.assert_close(got if isinstance(got, torch.Tensor) else got[0], want, atol=1e-4, rtol=1e-4)
    with pytest.raises(lora_fx.LoraFxError, match=r"--max-seq") as e:
        pkg(input_ids=example_ids(1, 20), use_cache=False)
    assert e.value.problems == ["input_ids.shape[1]: expected 2..16, found 20"]


def test_bench_takes_reps_and_passes_its_other_flags_through(monkeypatch, capsys):
    import lora_fx.bench as bench
    from lora_fx.cli import main

    given = []
    monkeypatch.setattr(bench, "main", lambda argv: given.append(argv) or 0)
    assert main(["bench", "--reps", "1", "--hidden", "64"]) == 0
    assert main(["bench", "--", "--layers", "2"]) == 0
    args = bench.parse(given[0])
    assert (args.reps, args.hidden) == (1, 64) and bench.parse(given[1]).layers == 2
    with pytest.raises(SystemExit) as e:
        main(["bench", "--reps", "0"])
    assert e.value.code == 2 and "--reps: expected an integer >= 1, found '0'" in capsys.readouterr().err
