"""Serving benchmark: a pool of 8 compiled slots over many registered adapters (lora_fx.pool).

    python benchmarks/serving.py --counts 16,256,1024 --steps 200 --out benchmarks/results/serving-cpu.md

A random-weight Llama (``--hidden`` / ``--layers``), adapters with ranks 4-16 on two target sets,
saved in PEFT's format and registered by path (read from disk on demand). Each batch is 8 rows
drawn from the traffic (Zipf(1.0) over the registered names, or uniform), entered with
``be.using(rows)``, then ``--decode`` decode-shaped calls (one new token per row over a
``--context``-token prompt, no KV cache). Reported: decode calls' p50 / p99 latency and rows/s,
against all adapters resident (a mixed backend with one slot per adapter; up to
``--resident-max``) and PEFT eager with ``adapter_names`` (up to ``--peft-max``); time to first
call for a cold adapter (from disk) and a warm (resident) one; the resident rows' p50 / p99 while
another thread loads cold adapters, and how much of it they waited for the backend's lock; an
all-None batch against the compiled base model.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time

import peft
import torch
import transformers as tf

import lora_fx
from lora_fx import LoraConfig
from lora_fx.loading import random_adapter

TARGETS = (["q_proj", "v_proj"], ["o_proj", "up_proj"])


def model_of(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2)
    return tf.LlamaForCausalLM(cfg).eval()


def make_adapters(model: torch.nn.Module, n: int, root: str, start: int = 0) -> dict[str, str]:
    rng, dirs = random.Random(0), {}
    for i in range(start, n):
        cfg = LoraConfig(r=rng.choice([4, 8, 16]), lora_alpha=16, target_modules=TARGETS[i % 2])
        d = f"{root}/ad{i:04d}"
        random_adapter(model, cfg, seed=i, std=0.05).save(d)
        dirs[f"ad{i:04d}"] = d
    return dirs


def traffic(names: list[str], kind: str, seed: int):
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(len(names))] if kind == "zipf" else None
    while True:
        yield rng.choices(names, weights, k=8)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class WaitTimed:
    """The backend's lock, adding up how long one thread (``thread``) waits to take it."""

    def __init__(self, lock):
        self.lock, self.waited, self.thread = lock, 0.0, None

    def acquire(self, *args, **kwargs) -> bool:
        t = time.perf_counter()
        got = self.lock.acquire(*args, **kwargs)
        if threading.get_ident() == self.thread:
            self.waited += time.perf_counter() - t
        return got

    def release(self) -> None:
        self.lock.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.lock.release()


def run(step, enter, names, kind, args) -> dict[str, float]:
    """Decode latency (ms) over ``args.steps`` batches; ``enter(rows)`` is the batch's context."""
    gen, times, ids = traffic(names, kind, 1), [], torch.randint(1, 512, (8, args.context))
    for n in range(args.steps + args.warmup):
        rows = next(gen)
        with enter(rows):
            for _ in range(args.decode):
                t = time.perf_counter()
                step(ids, rows)
                if n >= args.warmup:
                    times.append(1e3 * (time.perf_counter() - t))
    return {"p50": statistics.median(times), "p99": pct(times, 0.99), "rows/s": 8e3 / statistics.mean(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="16,256,1024")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--decode", type=int, default=4, help="decode calls per batch")
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--inner", default="inductor")
    p.add_argument("--resident-max", type=int, default=256)
    p.add_argument("--peft-max", type=int, default=256)
    p.add_argument("--out", default=None)
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval (s): how long a Python thread may keep the GIL from a waiting one")
    p.add_argument("--load-every", type=float, default=0.0,
                   help="ms between the loading thread's loads (0: back to back)")
    p.add_argument("--only-loads", action="store_true", help="only the resident rows' calls with and without loads")
    args = p.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    counts = [int(c) for c in args.counts.split(",")]
    torch.set_grad_enabled(False)
    lines = [f"# Serving pool: batch 8, {args.slots} slots ({args.inner}, CPU, {torch.get_num_threads()} threads, "
             f"Llama hidden {args.hidden} x {args.layers} layers, {args.context}-token context, "
             f"{args.decode} decode calls per batch)", "",
             "| registered | traffic | setup | p50 ms | p99 ms | rows/s |", "|---|---|---|---|---|---|"]
    root = tempfile.mkdtemp()
    model = model_of(args)
    dirs = make_adapters(model, max(counts), root)
    names = list(dirs)
    base_step = torch.compile(model_of(args), backend=args.inner)
    be = lora_fx.backend({n: dirs[n] for n in names[:2]}, slots=args.slots, inner=args.inner, max_rank=16,
                         host_bytes=64 << 20)
    for n in names[2:]:
        be.register(n, dirs[n])
    pool = model_of(args)
    pool_step = torch.compile(pool, backend=be)

    def pool_call(ids, rows):
        pool_step(input_ids=ids)

    for count in [] if args.only_loads else counts:
        for kind in ("zipf", "uniform"):
            r = run(pool_call, be.using, names[:count], kind, args)
            lines.append(f"| {count} | {kind} | pool, {args.slots} slots | {r['p50']:.2f} | {r['p99']:.2f} | "
                         f"{r['rows/s']:.0f} |")
            print(lines[-1], flush=True)
        if count <= args.resident_max:
            every = {n: lora_fx.load_adapter(dirs[n]) for n in names[:count]}
            mixed = lora_fx.backend(every, inner=args.inner, max_rank=16)
            m = model_of(args)
            step = torch.compile(m, backend=mixed)

            def select(rows, mixed=mixed):
                mixed.select(rows)
                return torch.no_grad()

            for kind in ("zipf", "uniform"):
                r = run(lambda ids, rows, step=step: step(input_ids=ids), select, names[:count], kind, args)
                lines.append(f"| {count} | {kind} | all resident | {r['p50']:.2f} | {r['p99']:.2f} | "
                             f"{r['rows/s']:.0f} |")
                print(lines[-1], flush=True)
        if count <= args.peft_max:
            pm = peft.PeftModel.from_pretrained(model_of(args), dirs[names[0]], adapter_name=names[0]).eval()
            for n in names[1:count]:
                pm.load_adapter(dirs[n], adapter_name=n)
            r = run(lambda ids, rows, pm=pm: pm(input_ids=ids, adapter_names=rows), lambda rows: torch.no_grad(),
                    names[:count], "zipf", args)
            lines.append(f"| {count} | zipf | PEFT eager, adapter_names | {r['p50']:.2f} | {r['p99']:.2f} | "
                         f"{r['rows/s']:.0f} |")
            print(lines[-1], flush=True)
            del pm

    ids = torch.randint(1, 512, (8, args.context))
    lines += ["", "| first call | ms |", "|---|---|"]
    # adapters registered now, never read: their first call reads them from disk
    fresh = make_adapters(model, max(counts) + 5, root, start=max(counts))
    for n, d in fresh.items():
        be.register(n, d)
    cold_names = list(fresh)
    cold, warm = [], []
    for n in cold_names:
        t = time.perf_counter()
        with be.using([n] * 8):
            pool_step(input_ids=ids)
        cold.append(1e3 * (time.perf_counter() - t))
        t = time.perf_counter()
        with be.using([n] * 8):
            pool_step(input_ids=ids)
        warm.append(1e3 * (time.perf_counter() - t))
    lines += [f"| cold adapter (from disk), median of {len(cold)} | {statistics.median(cold):.2f} |",
              f"| warm adapter (resident), median of {len(warm)} | {statistics.median(warm):.2f} |"]

    hot = names[:4]
    for n in hot:
        be.pin(n)

    lock = WaitTimed(be.state.lock)
    be.state.lock = be.lock = lock

    def resident_p99(loading: bool) -> tuple[float, float, float, float]:
        stop, times, waits = threading.Event(), [], []
        lock.thread = threading.get_ident()

        def loader():
            k = 0
            while not stop.is_set():
                name = cold_names[k % len(cold_names)] if k % 2 else names[-1 - k % len(names)]
                with be.using([name]):
                    pass
                k += 1
                stop.wait(args.load_every / 1e3)  # 0: a busy loop of loads

        t = threading.Thread(target=loader) if loading else None
        if t:
            t.start()
        for _ in range(args.steps):
            with be.using(hot * 2):
                s, w = time.perf_counter(), lock.waited
                pool_step(input_ids=ids)
                times.append(1e3 * (time.perf_counter() - s))
                waits.append(1e3 * (lock.waited - w))
        stop.set()
        if t:
            t.join()
        return pct(times, 0.5), pct(times, 0.99), pct(waits, 0.5), pct(waits, 0.99)

    quiet, busy = resident_p99(False), resident_p99(True)
    lines += [f"| resident rows' call, p50 / p99, no loads | {quiet[0]:.2f} / {quiet[1]:.2f} |",
              f"| resident rows' call, p50 / p99, another thread loading cold adapters"
              f"{f' (one every {args.load_every:g} ms)' if args.load_every else ' (back to back)'} | {busy[0]:.2f} / "
              f"{busy[1]:.2f} |",
              f"| of which waiting for the backend lock, p50 / p99, no loads | {quiet[2]:.3f} / {quiet[3]:.3f} |",
              f"| of which waiting for the backend lock, p50 / p99, another thread loading | {busy[2]:.3f} / "
              f"{busy[3]:.3f} |"]

    def timed(f) -> list[float]:  # ms of each of a batch's --decode calls
        out = []
        for _ in range(args.decode):
            s = time.perf_counter()
            f()
            out.append(1e3 * (time.perf_counter() - s))
        return out

    def plain():
        return timed(lambda: base_step(input_ids=ids))

    def in_block(rows):
        def batch():
            with be.using(rows):  # one block per batch, as a server enters one per request
                return timed(lambda: pool_step(input_ids=ids))
        return batch

    # the three in turn, batch by batch, so the machine's drift reaches each alike
    calls, ts = [plain, in_block([None] * 8), in_block(hot * 2)], [[], [], []]
    for k in range(args.warmup + 3 * args.steps):
        for i, f in enumerate(calls):
            t = f()
            if k >= args.warmup:
                ts[i] += t
    base_ms, none_ms, lora_ms = (statistics.median(t) for t in ts)
    lines += ["", f"| batch of 8, decode-shaped call (median of {3 * args.steps * args.decode}, {args.decode} per "
              "block, in turn) | ms | vs compiled base |",
              "|---|---|---|",
              f"| compiled base model | {base_ms:.3f} | 1.00x |",
              f"| pool, every row None | {none_ms:.3f} | {none_ms / base_ms:.3f}x |",
              f"| pool, 4 adapters | {lora_ms:.3f} | {lora_ms / base_ms:.3f}x |",
              "", f"compiles of the pool backend: {len(be.reports)}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
