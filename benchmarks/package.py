"""AOTInductor packages with a swappable adapter vs torch.compile: start-up, swap and per-call time.

    python benchmarks/package.py            # Llama hidden 512, 4 layers, GQA, vocab 8192, r=16, CPU fp32

Builds a branch-mode package (``lora_fx.export``, dynamic sequence length) once, then in fresh
processes measures: loading the package and its first call, against a cold ``torch.compile`` of
the same model with the lora_fx backend and its first call; in one process, a swap's latency and
the per-call time of a 128-token prefill for the package, lora_fx branch under torch.compile and
the compiled base (median of interleaved calls). Results: benchmarks/results/package-cpu.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from lora_fx.bench import in_worker, run_worker, save_table, script_parser

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_and_adapters(tmp: str, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_fx
    from lora_fx.loading import random_adapter

    torch.manual_seed(0)
    heads = args.hidden // 64
    cfg = LlamaConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads // 4)
    model = LlamaForCausalLM(cfg).eval()
    for i, seed in enumerate((1, 2)):
        d = os.path.join(tmp, f"adapter{i}")
        if not os.path.isdir(d):
            random_adapter(model, lora_fx.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=PROJ),
                           seed=seed, std=0.02).save(d)
    return model, [lora_fx.load_adapter(os.path.join(tmp, f"adapter{i}")) for i in (0, 1)]


def ids(n: int) -> torch.Tensor:
    return torch.randint(1, 8192, (1, n), generator=torch.Generator().manual_seed(n))


def cold(kind: str, tmp: str, args) -> dict:
    """A fresh process's start: load the package, or torch.compile; then the first call."""
    import lora_fx

    t0 = time.perf_counter()
    if kind == "package":
        run = lora_fx.load_package(os.path.join(tmp, "model.pt2"))
        ready = time.perf_counter() - t0
        fn = lambda x: run(input_ids=x, use_cache=False)  # noqa: E731
    else:
        model, adapters = model_and_adapters(tmp, args)
        compiled = torch.compile(model, backend=lora_fx.backend(adapters[0], mode="branch"))
        ready = time.perf_counter() - t0
        fn = lambda x: compiled(input_ids=x, use_cache=False)  # noqa: E731
    t1 = time.perf_counter()
    with torch.no_grad():
        fn(ids(args.seq))
    return {"ready_s": ready, "first_call_s": time.perf_counter() - t1}


def steady(tmp: str, args) -> dict:
    import lora_fx

    model, adapters = model_and_adapters(tmp, args)
    pkg = lora_fx.load_package(os.path.join(tmp, "model.pt2"), adapters[0])
    base = torch.compile(model)
    be = lora_fx.backend(adapters[0], mode="branch")
    branch = torch.compile(model, backend=be)
    x = ids(args.seq)
    fns = {"compiled base": lambda: base(input_ids=x, use_cache=False),
           "lora_fx branch (torch.compile)": lambda: branch(input_ids=x, use_cache=False),
           "package (AOTInductor)": lambda: pkg(input_ids=x, use_cache=False)}
    samples = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
            fn()
        for _ in range(args.reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t0)
        swaps = []
        for i in range(10):
            t0 = time.perf_counter()
            pkg.swap(adapters[(i + 1) % 2])
            swaps.append(time.perf_counter() - t0)
    return {"per_call": {k: statistics.median(v) for k, v in samples.items()}, "swap_s": statistics.median(swaps)}


def main(argv=None) -> int:
    p = script_parser(__doc__, "package-cpu.md", hidden=512, layers=4, rank=16, seq=128, reps=20)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if run_worker(args, lambda w, a: steady(a.tmp, a) if w == "steady" else cold(w, a.tmp, a)):
        return 0
    import lora_fx

    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = model_and_adapters(tmp, args)
        seq = torch.export.Dim("seq", min=2, max=2048)
        t0 = time.perf_counter()
        lora_fx.export(model, (), adapters[0], kwargs={"input_ids": ids(8), "use_cache": False},
                       dynamic_shapes={"input_ids": {1: seq}, "use_cache": None}, path=os.path.join(tmp, "model.pt2"))
        build = time.perf_counter() - t0

        given = list(argv or sys.argv[1:])
        pkg, comp, st = (in_worker(__file__, given, kind, "--tmp", tmp) for kind in ("package", "compile", "steady"))
    base = st["per_call"]["compiled base"]
    lines = [f"CPU fp32, Llama hidden {args.hidden}, {args.layers} layers, GQA, vocab 8192, r={args.rank} on 7 "
             f"projections, branch mode, prefill {args.seq} tokens.", "",
             "| | package (AOTInductor) | torch.compile + lora_fx |", "|---|---|---|",
             f"| build (once) | {build:.1f} s (export + rewrite + AOTInductor) | - |",
             f"| fresh process: load / compile set-up | {pkg['ready_s']:.2f} s | {comp['ready_s']:.2f} s "
             "(model built) |",
             f"| fresh process: first call | {pkg['first_call_s']:.2f} s | {comp['first_call_s']:.1f} s (compiles) |",
             f"| swap (another adapter, same process) | {st['swap_s'] * 1e3:.1f} ms (checked, then loaded) | "
             "see the serving table |", "", "| per call (median) | ms | ratio to the compiled base |", "|---|---|---|"]
    lines += [f"| {k} | {v * 1e3:.2f} | {v / base:.3f}x |" for k, v in st["per_call"].items()]
    save_table(args.out, __file__, given, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
