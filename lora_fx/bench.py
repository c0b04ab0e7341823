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

# split by job: bench_models (model, adapters, inputs, timing), bench_report (tables, chart); the
# names benchmarks/*.py import from lora_fx.bench are re-exported here
from .bench_models import CACHE_KW as CACHE_KW
from .bench_models import PROJ as PROJ
from .bench_models import WORKLOADS, Inputs, build, compiled_forward, make_adapter, timed, weights_bytes
from .bench_models import stored_bytes as stored_bytes
from .bench_models import sync as sync
from .bench_report import chart as chart
from .bench_report import report
from .bench_report import summarize as summarize
from .cli import positive_int

GROUPS = {  # process -> variants timed together with their own compiled base
    "eager": ["eager base", "PEFT eager", "PEFT merged eager", "PEFT compiled"],  # PEFT compiles its own frame
    "peft-compiled": ["PEFT compiled"],  # opt-in: PEFT compiled alone beside the base
    "fold": ["lora_fx fold"],
    "fold-inplace": ["lora_fx fold in-place"],  # opt-in group: --groups ...,fold-inplace
    "branch": ["lora_fx branch", "lora_fx mixed x4"],  # mixed: batch-8 decode only
    "compile": ["lora_fx fold", "lora_fx branch"],  # cold compiles, one after another
}


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
            reps = {"prefill": max(1, args.reps // 2), "generate": max(3, args.reps // 10)}.get(wl, args.reps)
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
    p.add_argument("--reps", type=positive_int, default=24,
                   help="timed calls per variant (decode; prefill takes half, at least 1)")
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
        more = ["--hidden", str(args.also_hidden), "--reps", str(max(1, args.reps // 2)), "--also-hidden", "0",
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


if __name__ == "__main__":
    sys.exit(main())
