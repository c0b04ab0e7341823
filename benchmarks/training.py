"""LoRA training in transformers' Trainer loop: lora_fx for_training vs PEFT eager, PEFT compiled, the floor.

    python benchmarks/training.py          # Llama hidden 512, 4 layers, GQA, seq 256, batch 4, r=16 all-linear
    python benchmarks/training.py --hidden 1024 --steps 6

Every variant is ``transformers.Trainer(model, args).train()`` with the same arguments (AdamW,
max_grad_norm 1.0, no gradient accumulation, fp32 on CPU); one step = what Trainer does for one
optimizer step (forward, backward, clipping, AdamW, zero_grad). The variants:

- floor: the frozen base compiled (``model.compile()``, Inductor), no adapter, the backward running
  to the input embeddings (``enable_input_require_grads``): what any LoRA step must at least cost.
- lora_fx: ``lora_fx.for_training(model, config)`` (its own compile: Trainer's
  ``torch_compile_backend=`` takes only accelerate's fixed list of backend names).
- PEFT eager: ``peft.get_peft_model``; PEFT compiled: the same with ``TrainingArguments(torch_compile=True)``.
- lora_fx, PEFT eager and PEFT compiled at lora_dropout 0.05 too (the others at 0).

Each variant runs in its own process (its own compile caches and memory). Step time: the median
over the timed steps after the warm-up ones (the first holds the compile, reported apart). Peak
memory: the bytes held by live tensors during one more step (torch.profiler's memory timeline over
every category: parameters, gradients, optimizer state, activations, temporaries; the CPU
counterpart of torch.cuda.max_memory_allocated), beside what they held when the step began.
Results: benchmarks/results/training-cpu.md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch

from lora_fx.bench import PROJ, build, in_worker, run_worker, save_table, script_parser

VARIANTS = ("floor", "lora_fx for_training", "PEFT eager", "PEFT compiled", "lora_fx for_training, dropout 0.05",
            "PEFT eager, dropout 0.05", "PEFT compiled, dropout 0.05")


def step_clock():
    """A TrainerCallback timing each optimizer step and profiling the memory of the last one."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.prof, self.t0 = [], None, 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == state.max_steps - 1:  # the last step: profiled, not timed
                self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                    with_stack=True)
                self.prof.start()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.t0
            if self.prof is not None:
                self.prof.stop()
            else:
                self.times.append(dt)

        def peak(self) -> tuple[float, float]:
            with tempfile.TemporaryDirectory() as tmp:
                self.prof.export_memory_timeline(os.path.join(tmp, "timeline.json"), device="cpu")
                with open(os.path.join(tmp, "timeline.json")) as f:
                    totals = [sum(row) for row in json.load(f)[1]]
            return max(totals) / 2 ** 20, totals[0] / 2 ** 20

    return StepClock()


def worker(variant: str, args) -> dict:
    import peft
    import transformers

    import lora_fx

    model = build(args).train()
    dropout = 0.05 if "dropout" in variant else 0.0
    config = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJ, lora_dropout=dropout)
    compile_peft, optimizers = False, (None, None)
    if variant == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        model.compile()
        unused = torch.nn.Parameter(torch.zeros(1))  # Trainer needs an optimizer; nothing here trains
        optimizers = (torch.optim.AdamW([unused], lr=1e-4), None)
    elif variant.startswith("lora_fx"):
        model = lora_fx.for_training(model, lora_fx.LoraConfig(**config))
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(**config))
        compile_peft = variant.startswith("PEFT compiled")
    steps = args.warmup + args.steps + 1
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (steps * args.batch, args.seq), generator=gen)
    data = [{"input_ids": x, "labels": x.clone()} for x in ids]
    clock = step_clock()
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
            lr_scheduler_type="constant", save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
            seed=0, disable_tqdm=True, dataloader_num_workers=0, torch_compile=compile_peft)
        trainer = transformers.Trainer(model=model, args=targs, train_dataset=data, callbacks=[clock],
                                       optimizers=optimizers)
        trainer.train()
    timed = clock.times[args.warmup:]
    peak, start = clock.peak()
    return {"median": statistics.median(timed), "min": min(timed), "max": max(timed), "first": clock.times[0],
            "peak_mb": peak, "start_mb": start, "times": clock.times}


def main(argv=None) -> int:
    args = script_parser(__doc__, "training-cpu.md", hidden=512, layers=4, vocab=8192, rank=16, seq=256, batch=4,
                         warmup=3, steps=8).parse_args(argv)
    if run_worker(args, worker):
        return 0
    given = list(argv or sys.argv[1:])
    res = {}
    for v in VARIANTS:
        res[v] = in_worker(__file__, given, v)
        print(v, res[v], flush=True)
    floor, peft_eager = res["floor"]["median"], res["PEFT eager"]["median"]
    lines = [f"CPU ({os.cpu_count()} cores, shared), fp32; Llama hidden {args.hidden}, {args.layers} layers, GQA "
             f"(KV heads = heads / 4), intermediate 3.5x, vocab {args.vocab}; seq {args.seq}, batch {args.batch}; "
             f"r={args.rank} on all 7 projections; transformers.Trainer, AdamW, max_grad_norm 1.0; median of "
             f"{args.steps} steps after {args.warmup} (the first step, with the compile, apart).", "",
             "| variant | step (ms) | min-max | / floor | / PEFT eager | first step (s) | peak tensor memory in a step "
             "(MiB) | at start |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {v} | {r['median'] * 1e3:.0f} | {r['min'] * 1e3:.0f}-{r['max'] * 1e3:.0f} | "
              f"{r['median'] / floor:.3f}x | {r['median'] / peft_eager:.3f}x | {r['first']:.1f} | "
              f"{r['peak_mb']:.0f} | {r['start_mb']:.0f} |" for v, r in res.items()]
    save_table(args.out, __file__, given, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
