"""Generate text with a LoRA adapter applied by lora_fx inside torch.compile.

With no arguments, a demo that runs offline in about a minute on 2 CPU cores:

  1. trains a tiny character-level Llama on one text (the base model),
  2. trains a LoRA adapter on another text through lora_fx's compiled branch mode,
     and saves it in PEFT's format,
  3. generates from the same prompts with the base model and with the adapter, side by side,
     and reports tokens/s for eager PEFT-style hooks, fold mode and branch mode.

With a local model and adapters:

  python examples/generate.py --model DIR --adapter DIR [--adapter DIR --scale X ...] \\
      --mode fold|branch --prompt "..." --max-new-tokens N

``--quantize nf4|int8`` puts the base model's linear layers in 4-bit NF4 (bitsandbytes, loaded
through transformers' BitsAndBytesConfig as QLoRA users do) or int8 (torchao weight-only) first;
the adapter then runs in branch mode over the quantized weights (fold needs dense weights), and
the demo trains it through the quantized base (QLoRA).

Each graph lora_fx compiles is logged on stderr as it is compiled (mode, modules, seconds);
``LORA_FX_LOGS=0`` silences it, ``LORA_FX_LOGS=debug`` adds each graph's modules.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import lora_fx

BASE_TEXT = (
    "the sea is calm tonight. the tide is full, the moon lies fair upon the straits. on the french coast "
    "the light gleams and is gone; the cliffs of england stand, glimmering and vast, out in the tranquil bay. "
    "come to the window, sweet is the night air! only, from the long line of spray where the sea meets the "
    "moon-blanched land, listen! you hear the grating roar of pebbles which the waves draw back, and fling. "
)
ADAPTER_TEXT = (
    "beep boop. the robot is online. all systems are fine. beep. the robot sees the sea. beep boop. "
    "the robot sees the moon. beep. the robot comes to the window. boop. the robot is calm. beep boop. "
)
PROMPTS = ["the sea ", "the moon ", "come to "]


def status(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Chars:
    """A character tokenizer over the demo texts."""

    def __init__(self, text: str):
        self.itos = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def encode(self, s: str) -> torch.Tensor:
        return torch.tensor([[self.stoi[c] for c in s if c in self.stoi]])

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids)


def tiny_llama(vocab: int, hidden: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def batches(ids: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=gen)
    x = torch.stack([ids[s:s + seq] for s in starts])
    return x


def train(model, params, ids: torch.Tensor, steps: int, lr: float, what: str, seq: int = 48, batch: int = 16) -> float:
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        x = batches(ids, seq, batch, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            status(f"training {what}: step {step + 1}/{steps}, loss {loss.item():.3f}")
    return loss.item()


@torch.no_grad()
def generate(model, tok: Chars, prompt: str, n: int) -> str:
    out = model.generate(tok.encode(prompt), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0].tolist())


@torch.no_grad()
def tokens_per_second(model, tok: Chars, n: int) -> float:
    ids = tok.encode(PROMPTS[0])
    model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)  # warm up / compile
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return n / (time.perf_counter() - t)


def quantized(model, how: str | None):
    """``model`` with its linear layers (not the output head) quantized: "nf4" (bitsandbytes) or
    "int8" (torchao); None: the model itself."""
    if how is None:
        return model
    if how == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
        return model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["lm_head"])
        return AutoModelForCausalLM.from_pretrained(d, quantization_config=qc, device_map="cpu",
                                                    dtype=torch.float32).eval()


def compiled_copy(model, backend):
    import copy

    m = copy.deepcopy(model)
    m.forward = torch.compile(m.forward, backend=backend)
    return m


def demo(base_steps: int, lora_steps: int, new_tokens: int, out_dir: str | None, inner: str = "inductor",
         quantize: str | None = None) -> None:
    tok = Chars(BASE_TEXT + ADAPTER_TEXT)
    base_ids = tok.encode(BASE_TEXT * 4)[0]
    lora_ids = tok.encode(ADAPTER_TEXT * 4)[0]
    model = tiny_llama(len(tok.itos), hidden=128 if quantize else 96)  # bitsandbytes' CPU kernel: multiples of 64
    status(f"base model: tiny Llama, {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters")
    train(model, model.parameters(), base_ids, base_steps, 3e-3, "base model")
    model.eval()
    model = quantized(model, quantize)
    for p in model.parameters():
        p.requires_grad_(False)
    if quantize:
        status(f"base model quantized: {lora_fx.quantized.module_format(model.model.layers[0].mlp.up_proj)}")
        model.enable_input_require_grads()  # QLoRA: the quantized kernels are traced with their backward

    config = lora_fx.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    adapter = lora_fx.init_adapter(model, config, seed=0, name="robot")
    status(f"adapter: {len(adapter.modules)} modules, r=8; compiling branch mode for training "
           "(first call, about 5 s)")
    be = lora_fx.backend(adapter, mode="branch", inner="aot_eager")
    trainee = compiled_copy(model, be)
    train(trainee, be.parameters(), lora_ids, lora_steps, 1e-2, "LoRA (lora_fx branch mode)")
    trained = be.trained_adapter()
    out_dir = out_dir or tempfile.mkdtemp(prefix="lora_fx_demo_")
    trained.save(out_dir)
    status(f"adapter saved in PEFT format: {out_dir}")
    adapter = lora_fx.load_adapter(out_dir)

    # fold needs dense weights: over a quantized base both columns come from branch mode
    # 2 CPU cores, Inductor: 2-11 s a graph, 8 graphs (each mode: prefill, decode, then dynamic ones)
    status(f"compiling {'branch mode' if quantize else 'fold and branch modes'} ({inner}) "
           f"(first call, about {60 if inner == 'inductor' else 20} s)")
    branch = compiled_copy(model, lora_fx.backend(adapter, mode="branch", inner=inner))
    fold = branch if quantize else compiled_copy(model, lora_fx.backend(adapter, mode="fold", inner=inner))
    shown = f"with the adapter ({'branch' if quantize else 'fold'})"
    rows = []  # all generated first: the compile logs come before the table, not inside it
    for prompt in PROMPTS:
        a = generate(model, tok, prompt, new_tokens).replace("\n", " ")
        b = generate(fold, tok, prompt, new_tokens).replace("\n", " ")
        c = generate(branch, tok, prompt, new_tokens)
        assert c.replace("\n", " ") == b, "fold and branch modes must agree"
        rows.append(f"{prompt!r:<12}| {a:<40}| {b:<40}")
    print(f"\n{'prompt':<12}| {'base model':<40}| {shown:<40}")
    print("-" * 96)
    print("\n".join(rows), flush=True)

    status("timing generation (tokens/s, greedy, batch 1)")
    with lora_fx.apply_lora(model, adapter):
        eager = tokens_per_second(model, tok, new_tokens)
    rates = {"eager, PEFT-style hooks": eager, "lora_fx branch": tokens_per_second(branch, tok, new_tokens)}
    if not quantize:
        rates["lora_fx fold"] = tokens_per_second(fold, tok, new_tokens)
    for name, r in rates.items():
        print(f"  {name:<26} {r:8.1f} tokens/s")


def run_local(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    tok = AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, args.dtype)
    model = quantized(AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval(), args.quantize)
    scales = args.scale or [1.0] * len(args.adapter)
    if len(scales) != len(args.adapter):
        raise SystemExit(f"--scale: expected one per --adapter ({len(args.adapter)}), found {len(scales)}")
    adapters = [lora_fx.load_adapter(d, scale=s) for d, s in zip(args.adapter, scales)]
    for a in adapters:
        a.check(model)
    status(f"compiling ({args.mode} mode, {len(adapters)} adapter(s)): prefill and decode graphs "
           "(first call, about 20 s a graph with Inductor on CPU, more for large models)")
    model.forward = torch.compile(model.forward, backend=lora_fx.backend(adapters, mode=args.mode))
    ids = tok(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             streamer=TextStreamer(tok, skip_prompt=False),
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    n = out.shape[1] - ids.shape[1]
    status(f"{n} tokens in {time.perf_counter() - t:.1f}s (compile included)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local transformers causal LM directory (with its tokenizer)")
    p.add_argument("--adapter", action="append", default=[], help="a PEFT adapter directory (repeatable)")
    p.add_argument("--scale", action="append", type=float, help="load-time scale, one per --adapter")
    p.add_argument("--mode", choices=["fold", "branch"], default="fold")
    p.add_argument("--prompt", default="Hello")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--base-steps", type=int, default=200, help="demo: training steps of the base model")
    p.add_argument("--lora-steps", type=int, default=150, help="demo: training steps of the adapter")
    p.add_argument("--out", help="demo: where to save the trained adapter")
    p.add_argument("--inner", default="inductor", help="demo: inner compiler (inductor, aot_eager)")
    p.add_argument("--quantize", choices=["nf4", "int8"], help="quantize the base model (branch mode over it)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if "LORA_FX_LOGS" not in os.environ:  # the user's setting wins
        lora_fx.set_logs("info")  # one line per graph as it is compiled: compiling is the slow part
    # Each model object compiled here adds dynamo cache entries to the same forward code (prefill,
    # decode, dynamic decode): past the default limit of 8 dynamo would quietly run eager code.
    torch._dynamo.config.recompile_limit = 64
    if args.model:
        if not args.adapter:
            p.error("--model needs at least one --adapter")
        if args.quantize and args.mode == "fold":
            p.error("--quantize: fold needs dense weights; use --mode branch")
        run_local(args)
    else:
        demo(args.base_steps, args.lora_steps, args.max_new_tokens, args.out, args.inner, args.quantize)


if __name__ == "__main__":
    sys.exit(main())
