"""A compiled LoRA training step: lora_fx branch vs PEFT eager, PEFT compiled and the floor.

    python benchmarks/training.py                  # Llama hidden 512, 4 layers, GQA, seq 256, r=16, CPU fp32
    python benchmarks/training.py --hidden 1024 --steps 6

One step = forward, backward, AdamW on the adapter. The floor is the compiled frozen base with
the backward to its input only (what any LoRA step must at least cost). Each variant runs in its
own process (its own compile caches and memory); step time is the median over the timed steps
after warm-up. Peak memory is that of live tensors during one more step, from torch.profiler's
memory timeline (parameters, gradients, optimizer state, activations and temporaries: what
torch.cuda.max_memory_allocated counts on a GPU), beside what they held when the step began.
Results: benchmarks/results/training-cpu.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from lora_fx.bench import PROJ, build, in_worker, run_worker, save_table, script_parser

VARIANTS = ("floor", "lora_fx branch", "PEFT eager", "PEFT compiled")


def peak_tensor_bytes(step) -> tuple[int, int]:
    """(peak, at start) of the bytes held by live tensors during one ``step``: torch.profiler's
    memory timeline over every category (parameters, gradients, optimizer state, activations,
    temporaries), the CPU counterpart of torch.cuda.max_memory_allocated."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        p.export_memory_timeline(os.path.join(tmp, "timeline.json"), device="cpu")
        with open(os.path.join(tmp, "timeline.json")) as f:
            totals = [sum(row) for row in json.load(f)[1]]
    return max(totals), totals[0]


def worker(variant: str, args) -> dict:
    import peft

    import lora_fx

    model = build(args).train()
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
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak, start = peak_tensor_bytes(step)  # one more step, profiled
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "peak_mb": peak / 2 ** 20,
            "start_mb": start / 2 ** 20}


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
             "| variant | step (ms) | min-max | ratio to the floor | peak tensor memory in a step (MiB) | at start |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {v} | {r['median'] * 1e3:.1f} | {r['min'] * 1e3:.0f}-{r['max'] * 1e3:.0f} | "
              f"{r['median'] / floor:.3f}x | {r['peak_mb']:.0f} | {r['start_mb']:.0f} |" for v, r in res.items()]
    save_table(args.out, __file__, given, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
