"""A compiled LoRA training step: lora_fx branch vs PEFT eager, PEFT compiled and the floor.

    python benchmarks/training.py                  # Llama hidden 512, 4 layers, GQA, seq 256, r=16, CPU fp32
    python benchmarks/training.py --hidden 1024 --steps 6

One step = forward, backward, AdamW on the adapter. The floor is the compiled frozen base with
the backward to its input only (what any LoRA step must at least cost). Each variant runs in its
own process (its own compile caches and memory); step time is the median over the timed steps
after warm-up, and peak memory the largest resident set sampled (every 2 ms) during the timed
steps, minus the resident set just before them. Results: benchmarks/results/training-cpu.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time

import torch

from lora_fx.bench import in_worker, run_worker, save_table, script_parser

VARIANTS = ("floor", "lora_fx branch", "PEFT eager", "PEFT compiled")
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """The largest resident set seen while running, sampled on a thread."""

    def __enter__(self):
        self.start, self.peak, self.done = rss(), 0, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()


def worker(variant: str, args) -> dict:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_fx

    torch.manual_seed(0)
    heads = args.hidden // 64
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4))
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    ids = torch.randint(1, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(1))
    lcfg = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJ)
    if variant == "floor":
        compiled = torch.compile(model)
        embed = model.get_input_embeddings()

        def step():
            x = embed(ids).detach().requires_grad_(True)
            compiled(inputs_embeds=x, labels=ids).loss.backward()
    elif variant == "lora_fx branch":
        be = lora_fx.backend(lora_fx.init_adapter(model, lora_fx.LoraConfig(**lcfg), seed=0), mode="branch")
        compiled = torch.compile(model, backend=be)
        opt = torch.optim.AdamW(be.parameters(), lr=1e-4)

        def step():
            compiled(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        pm = peft.get_peft_model(model, peft.LoraConfig(**lcfg))
        run = torch.compile(pm) if variant == "PEFT compiled" else pm
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)

        def step():
            run(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        step()
    times = []
    with Peak() as peak:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "peak_mb": (peak.peak - peak.start) / 2 ** 20}


def main(argv=None) -> int:
    args = script_parser(__doc__, "training-cpu.md", hidden=512, layers=4, vocab=8192, rank=16, seq=256, warmup=3,
                         steps=10).parse_args(argv)
    if run_worker(args, worker):
        return 0
    given = list(argv or sys.argv[1:])
    res = {v: in_worker(__file__, given, v) for v in VARIANTS}
    floor = res["floor"]["median"]
    lines = [f"CPU fp32, Llama hidden {args.hidden}, {args.layers} layers, GQA (KV heads = heads / 4), intermediate "
             f"3.5x, vocab {args.vocab}; seq {args.seq}, batch 1; r={args.rank} on 7 projections; one step = forward, "
             f"backward, AdamW on the adapter; median of {args.steps} steps after {args.warmup}.", "",
             "| variant | step (ms) | min-max | ratio to the floor | peak memory during steps (MiB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {v} | {r['median'] * 1e3:.1f} | {r['min'] * 1e3:.0f}-{r['max'] * 1e3:.0f} | "
              f"{r['median'] / floor:.3f}x | {r['peak_mb']:.0f} |" for v, r in res.items()]
    save_table(args.out, __file__, given, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
