"""Benchmark: lora_fx against PEFT and the compiled base model, as ratios measured side by side.

    python benchmarks/bench.py                # or: lora-fx bench
    python benchmarks/bench.py --hidden 2048 --layers 16 --dtype bfloat16 --device cuda

The default model has today's shapes (grouped-query attention with 4 query heads per KV head,
intermediate 3.5x hidden) at hidden 512, then fold and branch again at hidden 1024
(``--also-hidden``). Each lora_fx variant runs in its own process beside its own compiled base
model (so dynamo's cache entries per code object stay comparable; PEFT compiles its own frame);
inside a process the variants are timed in turn, call by call, and each figure is a median over
many calls. Ratios are to that process's compiled base. Results go to
benchmarks/results/<tag>.{json,md,png} (and <tag>-h1024.*).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

GROUPS = {  # process -> variants timed together with their own compiled base
    "eager": ["eager base", "PEFT eager", "PEFT merged eager", "PEFT compiled"],  # PEFT compiles its own frame
    "peft-compiled": ["PEFT compiled"],  # opt-in: PEFT compiled alone beside the base
    "fold": ["lora_fx fold"],
    "fold-inplace": ["lora_fx fold in-place"],  # opt-in group: --groups ...,fold-inplace
    "branch": ["lora_fx branch", "lora_fx mixed x4"],  # mixed: batch-8 decode only
    "compile": ["lora_fx fold", "lora_fx branch"],  # cold compiles, one after another
}
WORKLOADS = ("prefill", "decode", "decode b8", "generate")
CACHE_KW = "cache" if "cache" in __import__("inspect").signature(
    __import__("transformers").LlamaForCausalLM.forward).parameters else "past_key_values"
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    ratio, groups = getattr(args, "mlp_ratio", 3.5), getattr(args, "kv_groups", 4)  # today's shapes by default
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=int(args.hidden * ratio) // 8 * 8, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // groups),
                      max_position_embeddings=4096)
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    return LlamaForCausalLM(cfg).eval().to(getattr(args, "device", "cpu"), dtype)


def make_adapter(model, args, seed: int, out_dir: str):
    import lora_fx
    from lora_fx.loading import random_adapter

    cfg = lora_fx.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJ)
    ad = random_adapter(model.cpu().float(), cfg, seed=seed, std=0.02)
    model.to(args.device, getattr(torch, args.dtype))
    ad.save(out_dir)
    return lora_fx.load_adapter(out_dir)


class Inputs:
    """Inputs per workload; decode caches are cropped back to the prompt length after each call."""

    def __init__(self, args):
        gen = torch.Generator().manual_seed(0)
        self.args = args
        self.prefill = torch.randint(0, args.vocab, (1, args.seq), generator=gen).to(args.device)
        self.prompt = {b: torch.randint(0, args.vocab, (b, args.seq), generator=gen).to(args.device) for b in (1, 8)}
        self.step = {b: torch.randint(0, args.vocab, (b, 1), generator=gen).to(args.device) for b in (1, 8)}

    def workload(self, model, name: str) -> Callable[[], object]:
        if name == "prefill":
            return lambda: model(input_ids=self.prefill, use_cache=False)
        if name == "generate":
            ids = self.prompt[1][:, :16]
            return lambda: model.generate(ids, max_new_tokens=self.args.new_tokens, do_sample=False,
                                          min_new_tokens=self.args.new_tokens, pad_token_id=0)
        b = 8 if name == "decode b8" else 1
        # the KV cache is filled by the model's own uncompiled forward: the prompt's graph is not
        # what this workload times, and compiling it for every variant would double the run
        eager = getattr(model.forward, "_torchdynamo_orig_callable", model.forward)
        first = eager(input_ids=self.prompt[b], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values  # transformers 5 / 4 name

        def step():
            out = model(input_ids=self.step[b], **{CACHE_KW: cache}, use_cache=True)
            cache.crop(-1)  # back to the prompt length
            return out

        return step


def sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, args) -> float:
    sync(args)
    t = time.perf_counter()
    fn()
    sync(args)
    return time.perf_counter() - t


def compiled_forward(model, backend=None):
    model.forward = torch.compile(model.forward, backend=backend or "inductor", dynamic=True)
    return model


def variants_for(group: str, args, tmp: str) -> dict:
    """name -> (model, select-hook or None); the first entry is the group's compiled base."""
    import peft

    import lora_fx

    base = build(args)
    adapters = [make_adapter(base, args, seed, os.path.join(tmp, f"a{seed}")) for seed in range(4)]
    out = {"compiled base": compiled_forward(copy.deepcopy(base))}
    extra = {}
    for name in GROUPS[group]:
        if name == "eager base":
            out[name] = copy.deepcopy(base)
        elif name.startswith("PEFT"):
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(tmp, "a0")).eval()
            if name == "PEFT merged eager":
                pm = pm.merge_and_unload()
            elif name == "PEFT compiled":
                pm.forward = torch.compile(pm.forward, dynamic=True)
            out[name] = pm
        elif name in ("lora_fx fold", "lora_fx branch", "lora_fx fold in-place"):
            be = lora_fx.backend(adapters[0], mode="fold" if "fold" in name else "branch", inplace="in-place" in name)
            out[name] = compiled_forward(copy.deepcopy(base), be)
            extra[name] = be
        elif name == "lora_fx mixed x4":
            be = lora_fx.backend({f"a{i}": a for i, a in enumerate(adapters)}, mode="branch")
            be.select([f"a{i % 4}" for i in range(8)])
            out[name] = compiled_forward(copy.deepcopy(base), be)
            extra[name] = be
    return out, extra, adapters, base


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` keeps in memory: a quantized tensor subclass (torchao) counts its inner tensors,
    not its logical shape times its logical dtype."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weights_bytes(model, be=None) -> int:
    n = sum(stored_bytes(p) for p in model.parameters())
    if be is not None:
        n += sum(stored_bytes(t) for t in be.state.held())
    return n


def run_group(group: str, args) -> dict:
    torch._dynamo.config.recompile_limit = 64
    if group == "compile":
        return compile_times(args)
    res: dict = {"group": group, "times": {}, "weights_mib": {}}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        models, backends, adapters, base = variants_for(group, args, tmp)
        inputs = Inputs(args)
        for wl in args.workloads.split(","):
            fns = {name: inputs.workload(m, wl) for name, m in models.items()
                   if "mixed" not in name or wl == "decode b8"}
            for fn in fns.values():  # compile and warm up
                fn()
            reps = {"prefill": args.reps // 2, "generate": max(3, args.reps // 10)}.get(wl, args.reps)
            samples = {name: [] for name in fns}
            for _ in range(reps):
                for name, fn in fns.items():
                    samples[name].append(timed(fn, args))
            res["times"][wl] = samples
        for name, model in models.items():  # after the graphs built their tensors
            res["weights_mib"][name] = weights_bytes(model, backends.get(name)) / 2**20
        if group in ("fold", "branch"):
            res["swap_ms"] = swap_latency(backends[f"lora_fx {group}"], adapters, tmp, inputs)
        if "PEFT compiled" in models:
            res["swap_ms"] = peft_swap_latency(models["PEFT compiled"], tmp)
    return res


def compile_times(args) -> dict:
    """Cold compiles of the prefill graph: the compiled base, fold and branch in turn, ``--compile-reps``
    rounds; each after a dynamo reset, in a fresh Inductor cache (on disk and in memory: no kernel
    compiled for one variant serves another), FX graph and AOT caches off. A warm-up compile of an
    unrelated function first takes the process's one-time costs out of the figures."""
    from torch._inductor import utils as inductor_utils

    fresh = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    torch._inductor.config.fx_graph_cache = False
    if hasattr(torch._functorch.config, "enable_autograd_cache"):
        torch._functorch.config.enable_autograd_cache = False
    out: dict = {"group": "compile", "compile_s": {}, "compile_samples": {}}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        models, _, _, _ = variants_for("compile", args, tmp)
        inputs = Inputs(args)
        with fresh():
            torch.compile(lambda x: (x.sin() * 3).cumsum(0))(torch.randn(7, device=args.device))
        samples: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.compile_reps):
            for name, model in models.items():
                torch._dynamo.reset()
                with fresh():
                    samples[name].append(timed(inputs.workload(model, "prefill"), args))
    out["compile_samples"] = samples
    out["compile_s"] = {name: statistics.median(s) for name, s in samples.items()}
    return out


def swap_latency(be, adapters, tmp, inputs) -> dict:
    import lora_fx

    def load_and_swap(i):
        be.swap(lora_fx.load_adapter(os.path.join(tmp, f"a{i % 4}")))

    t_swap = statistics.median(timed(lambda i=i: be.swap(adapters[i % 4]), inputs.args) for i in range(20)) * 1e3
    t_load = statistics.median(timed(lambda i=i: load_and_swap(i), inputs.args) for i in range(20)) * 1e3
    return {"swap": t_swap, "load + swap": t_load}  # a recompile's cost: the "compile" group


def peft_swap_latency(pm, tmp) -> dict:
    from peft.utils.hotswap import hotswap_adapter

    times = [timed(lambda i=i: hotswap_adapter(pm, os.path.join(tmp, f"a{i % 4}"), adapter_name="default"),
                   argparse.Namespace(device="cpu")) for i in range(1, 21)]
    return {"PEFT hotswap_adapter (load + swap)": statistics.median(times) * 1e3}


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


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mlp-ratio", type=float, default=3.5, help="intermediate size / hidden")
    p.add_argument("--kv-groups", type=int, default=4, help="query heads per KV head (grouped-query attention)")
    p.add_argument("--also-hidden", type=int, default=1024,
                   help="then the fold and branch groups at this hidden size (prefill and decode, half the reps; "
                        "0: skip)")
    p.add_argument("--seq", type=int, default=128, help="prefill length and decode KV-cache length")
    p.add_argument("--new-tokens", type=int, default=32, help="generate: tokens per call")
    p.add_argument("--reps", type=int, default=24, help="timed calls per variant (decode; prefill takes half)")
    p.add_argument("--compile-reps", type=int, default=1, help="cold compiles per variant (compile group)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--groups", default=",".join(g for g in GROUPS if g not in ("fold-inplace", "peft-compiled")),
                   help=f"processes to run, of {list(GROUPS)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {list(WORKLOADS)}")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--tag", default=None, help="file name stem (default: device-dtype)")
    p.add_argument("--from-raw", help="only rebuild the table and chart from a saved .raw.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_group(args.worker, args)), flush=True)
        return 0
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or f"{args.device.split(':')[0]}-{args.dtype}"
    if args.from_raw:
        with open(args.from_raw) as f:
            return report(json.load(f), args, tag)
    results = []
    cache_dir = tempfile.mkdtemp(prefix="lora_fx_bench_")
    given, passthrough = list(argv if argv is not None else sys.argv[1:]), []
    while given:
        a = given.pop(0)
        if a == "--groups":
            given.pop(0)
        elif not a.startswith("--groups="):
            passthrough.append(a)
    for group in args.groups.split(","):
        t = time.time()
        print(f"[bench] {group}: {GROUPS[group]} beside a compiled base ...", flush=True)
        # one Inductor cache per run: the base model's graphs compile once for all processes
        cache = tempfile.mkdtemp(prefix="lora_fx_cold_") if group == "compile" else cache_dir
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        proc = subprocess.run([sys.executable, "-m", "lora_fx.bench", *passthrough, "--worker", group],
                              capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"[bench] {group} failed (exit {proc.returncode})")
        results.append(json.loads(lines[-1][7:]))
        with open(os.path.join(args.out, f"{tag}.raw.json"), "w") as f:  # kept even if a later group fails
            json.dump(results, f)
        print(f"[bench] {group}: done in {time.time() - t:.0f}s", flush=True)
    report(results, args, tag)
    if args.also_hidden and args.also_hidden != args.hidden and not args.worker:
        more = ["--hidden", str(args.also_hidden), "--reps", str(max(4, args.reps // 2)), "--also-hidden", "0",
                "--workloads", "prefill,decode", "--groups", "fold,branch"]
        return main([*passthrough, "--tag", f"{tag}-h{args.also_hidden}", *more])
    return 0


def script_parser(doc: str, out: str, **options: Any) -> argparse.ArgumentParser:
    """A benchmark script's arguments: ``options`` (name -> default; ``--name``, typed as its
    default), ``--out`` (under benchmarks/results) and the hidden ``--worker``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in options.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", out))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def run_worker(args: argparse.Namespace, worker: Callable[[str, argparse.Namespace], dict]) -> bool:
    """In a worker process (``--worker``): print ``worker``'s result as the RESULT line
    :func:`in_worker` reads, and return True."""
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)))
    return bool(args.worker)


def in_worker(script: str, argv: list[str], worker: str, *extra: str) -> dict:
    """Run ``script`` again in a fresh process as ``--worker worker`` (own dynamo caches and memory);
    the dict its ``RESULT {json}`` line prints."""
    out = subprocess.run([sys.executable, script, *argv, "--worker", worker, *extra],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def save_table(path: str, script: str, argv: list[str], text: str) -> None:
    """Print a benchmark's table and write it to ``path`` under the command that made it."""
    print(text)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"`python benchmarks/{os.path.basename(script)} {' '.join(argv)}`\n\n{text}\n")


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


if __name__ == "__main__":
    sys.exit(main())
