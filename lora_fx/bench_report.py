"""The benchmark's report: the groups' raw timings as ratios to each process's compiled base, a
markdown table, a JSON file and a bar chart (benchmarks/results/<tag>.{md,json,png}).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from .bench_models import WORKLOADS


def summarize(results: list[dict], args) -> tuple[str, dict]:
    rows, table = [], {}
    for res in results:
        for wl, samples in res.get("times", {}).items():
            base = statistics.median(samples["compiled base"])
            for name, s in samples.items():
                if name == "compiled base" and res["group"] != "eager":
                    continue
                med = statistics.median(s)
                best = min(samples["compiled base"])
                table.setdefault(name, {})[wl] = dict(median_ms=med * 1e3, min_ms=min(s) * 1e3, max_ms=max(s) * 1e3,
                                                      ratio=med / base, ratio_min=min(s) / best)
    for res in results:
        for name, c in res.get("compile_s", {}).items():
            t = table.setdefault(name, {})
            t["compile_ratio"] = c / res["compile_s"]["compiled base"]
            samples = res.get("compile_samples", {})
            if samples:
                t["compile_ratio_min"] = min(samples[name]) / min(samples["compiled base"])
        for name, w in res.get("weights_mib", {}).items():
            table.setdefault(name, {})["weights_ratio"] = w / res["weights_mib"]["compiled base"]
    head = "| variant | " + " | ".join(WORKLOADS) + " | compile | weights |"
    rows.append(head)
    rows.append("|" + "---|" * (len(WORKLOADS) + 3))
    for name, t in table.items():
        cells = []
        for wl in WORKLOADS:
            c = t.get(wl)
            cells.append("" if c is None else f"{c['ratio']:.3f}x ({c['ratio_min']:.3f}x)")
        comp, comp_min = t.get("compile_ratio"), t.get("compile_ratio_min")
        cells.append("" if comp is None or "eager" in name else
                     f"{comp:.2f}x" + ("" if comp_min is None else f" ({comp_min:.2f}x)"))
        cells.append(f"{t.get('weights_ratio', 1):.3f}x")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    swaps = {(a if a.startswith("PEFT") else f"lora_fx {res['group']}: {a}"): b
             for res in results for a, b in res.get("swap_ms", {}).items()}
    for res in results:  # a recompile for a new adapter costs at least a cold compile of the prefill graph
        if "lora_fx branch" in res.get("compile_s", {}):
            cold = res["compile_s"]["lora_fx branch"] * 1e3
            swaps["lora_fx branch: recompile instead (cold compile, prefill graph)"] = cold
    if swaps:
        rows += ["", "| swap | ms |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in swaps.items()]
    return "\n".join(rows), {"table": table, "swap_ms": swaps}


def chart(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summary["table"] if any(w in summary["table"][n] for w in WORKLOADS)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [summary["table"][name].get(w, {}).get("ratio", 0) for w in WORKLOADS]
        ax.bar([x + i * width for x in range(len(WORKLOADS))], vals, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(WORKLOADS))], WORKLOADS)
    ax.set_ylabel("time / compiled base (lower is better)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: list[dict], args: argparse.Namespace, tag: str) -> int:
    """Write <tag>.md, <tag>.json and <tag>.png from the groups' results, and print the table."""
    text, summary = summarize(results, args)
    inter, kv = int(args.hidden * args.mlp_ratio) // 8 * 8, args.hidden // args.kv_groups
    layer = args.hidden * (2 * args.hidden + 2 * kv) + 3 * args.hidden * inter  # weight MACs per token
    head = args.vocab * args.hidden
    header = (f"lora_fx benchmark: Llama hidden {args.hidden}, {args.layers} layers, intermediate {inter}, "
              f"{args.kv_groups} query heads per KV head, vocab {args.vocab} (output head: "
              f"{head / (head + args.layers * layer):.0%} of the weight FLOPs), r={args.rank} "
              f"on all 7 projections, {args.dtype} on {args.device}; prefill {args.seq} tokens, decode with a "
              f"{args.seq}-token KV cache, generate {args.new_tokens} tokens. Ratios: median time / the compiled "
              f"base's median in the same process (in brackets: best call / best call). Absolute times are in the "
              f"JSON file; compare them only within one process.")
    with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
        f.write(header + "\n\n" + text + "\n")
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "summary": summary}, f, indent=1)
    chart(summary, os.path.join(args.out, f"{tag}.png"))
    print(header + "\n\n" + text)
    return 0
