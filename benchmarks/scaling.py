"""How lora_fx's cost over the compiled base moves with tokens, rank, mixed-batch adapters and hidden size.

    python benchmarks/scaling.py                       # all four axes, CPU fp32 (about 12 minutes here)
    python benchmarks/scaling.py --axes tokens,rank --reps 12

Each point runs in its own process: a Llama-shaped model (GQA, KV heads = heads / 4, intermediate
3.5x hidden, r on all 7 projections) compiled with Inductor as the base, lora_fx branch and lora_fx
fold (for the adapters axis: a mixed batch of 8 rows over N adapters), timed call by call in turn.
A point's ratio is the variant's median call over the base's median call in the same process.

- tokens: one forward of 1, 8, 128 and 512 tokens (batch 1, no KV cache), hidden 512, r=16.
- rank: prefill of 128 tokens at r = 8, 16, 64.
- adapters: batch-8 decode after 128 tokens, the 8 rows spread over 4, 16 or 64 adapters (r=16).
- hidden: prefill of 128 tokens at hidden 256, 512, 1024 (r=16).

Results: benchmarks/results/scaling-cpu.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from lora_fx.bench import PROJ, Inputs, build, in_worker, run_worker, script_parser, timed

AXES = {"tokens": [1, 8, 128, 512], "rank": [8, 16, 64], "adapters": [4, 16, 64], "hidden": [256, 512, 1024]}


def model_args(args, axis: str, value: int) -> argparse.Namespace:
    """The point's settings: the axis's value, the defaults elsewhere (128 tokens)."""
    a = argparse.Namespace(**vars(args), seq=128)
    setattr(a, {"tokens": "seq", "rank": "rank", "hidden": "hidden", "adapters": "seq"}[axis],
            value if axis != "adapters" else 128)
    return a


def worker(point: str, args) -> dict:
    import copy

    import lora_fx
    from lora_fx.loading import random_adapter

    axis, value = point.split("=")
    value = int(value)
    a = model_args(args, axis, value)
    torch._dynamo.config.recompile_limit = 64
    base = build(a)
    cfg = lora_fx.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=PROJ)
    n = value if axis == "adapters" else 1
    adapters = {f"a{i}": random_adapter(base, cfg, seed=i, std=0.02) for i in range(n)}

    def compiled(be=None):
        m = copy.deepcopy(base)
        m.forward = torch.compile(m.forward, backend=be or "inductor", dynamic=False)
        return m

    models = {"base": compiled()}
    if axis == "adapters":
        be = lora_fx.backend(adapters, mode="branch")
        be.select([f"a{i % n}" for i in range(8)])
        models["mixed"] = compiled(be)
        workload = "decode b8"
    else:
        models["branch"] = compiled(lora_fx.backend(adapters["a0"], mode="branch"))
        models["fold"] = compiled(lora_fx.backend(adapters["a0"], mode="fold"))
        workload = "prefill"
    inputs = Inputs(a)
    with torch.no_grad():
        fns = {name: inputs.workload(m, workload) for name, m in models.items()}
        for fn in fns.values():  # compile, then the recompile a cropped KV cache's strides cause
            fn()
            fn()
        samples = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                samples[name].append(timed(fn, a))
    med = {name: statistics.median(s) for name, s in samples.items()}
    return {"axis": axis, "value": value, "ratio": {k: med[k] / med["base"] for k in med if k != "base"},
            "best": {k: min(samples[k]) / min(samples["base"]) for k in med if k != "base"},
            "base_ms": med["base"] * 1e3}


def table(results: list[dict]) -> str:
    lines = ["| axis | value | base (ms) | variant | ratio (median) | best / best |", "|---|---|---|---|---|---|"]
    for r in results:
        for name, ratio in r["ratio"].items():
            lines.append(f"| {r['axis']} | {r['value']} | {r['base_ms']:.2f} | {name} | {ratio:.3f}x | "
                         f"{r['best'][name]:.3f}x |")
    return "\n".join(lines)


def chart(results: list[dict], axes: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, len(axes), figsize=(4 * len(axes), 3.4), squeeze=False)
    for ax, axis in zip(panels[0], axes):
        pts = [r for r in results if r["axis"] == axis]
        for name in dict.fromkeys(k for r in pts for k in r["ratio"]):
            xs = [r["value"] for r in pts if name in r["ratio"]]
            ax.plot(xs, [r["ratio"][name] for r in pts if name in r["ratio"]], marker="o", label=name)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["value"] for r in pts], [str(r["value"]) for r in pts])
        ax.set_xlabel({"tokens": "tokens per call", "rank": "rank (prefill 128)", "adapters":
                       "adapters in a batch-8 decode", "hidden": "hidden size (prefill 128)"}[axis])
        ax.set_ylabel("time / compiled base")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    args = script_parser(__doc__, "scaling-cpu", axes=",".join(AXES), hidden=512, layers=2, vocab=8192, rank=16,
                         reps=16, device="cpu").parse_args(argv)
    if run_worker(args, worker):
        return 0
    given = list(argv if argv is not None else sys.argv[1:])
    axes = args.axes.split(",")
    results = []
    for axis in axes:
        for value in AXES[axis]:
            results.append(in_worker(__file__, given, f"{axis}={value}"))
            print(f"[scaling] {axis}={value}: " + ", ".join(f"{k} {v:.3f}x" for k, v in results[-1]["ratio"].items()),
                  flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    text = (f"`python benchmarks/scaling.py {' '.join(given)}`\n\nCPU fp32, Llama-shaped (GQA, intermediate 3.5x "
            f"hidden), {args.layers} layers, vocab {args.vocab}, all 7 projections; each point its own process; "
            f"ratio = median call / the compiled base's median call in that process ({args.reps} calls each).\n\n"
            + table(results))
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    chart(results, axes, args.out + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
