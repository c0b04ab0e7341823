"""LoRA on a Mixtral-shaped MoE (fused 3-D experts): lora_fx branch and fold against the compiled base,
PEFT eager and PEFT compiled, for prefill and decode, per experts implementation.

    python benchmarks/moe.py                              # grouped_mm; hidden 512, 8 experts, top-2, 2 layers
    python benchmarks/moe.py --layers 4 --reps 30
    python benchmarks/moe.py --impl batched_mm --prefill 1x32,4x32       # see batched_mm below
    python benchmarks/moe.py --quick                      # tiny shapes: a smoke test, not a measurement

The model: a transformers 5 ``MixtralForCausalLM`` from a config, random weights, fp32 on CPU, hidden
``--hidden`` (heads of 64, KV heads = heads / 4), ``--experts`` experts, top-``--top-k``, expert
intermediate ``--intermediate`` (default 3.5x hidden, Mixtral's 14336 / 4096), vocab ``--vocab``;
``set_experts_implementation(impl)`` for each ``--impl``. The adapter: PEFT ``get_peft_model`` with
r=``--rank``, lora_alpha=2r on q/k/v/o_proj (``target_modules``) and ``mlp.experts.gate_up_proj`` /
``mlp.experts.down_proj`` (``target_parameters``: one rank-r pair per expert), A and B drawn from
N(0, 0.02) (PEFT's default B = 0 would time a no-op). lora_fx takes it with ``lora_fx.from_peft``.

Workloads: prefill ``--prefill`` (BxS: B rows of S tokens, no cache) and decode ``--decode`` (B rows,
one new token each over a ``--context``-token KV cache, cropped back after each call, filled by the
model's uncompiled forward; for lora_fx, which runs only compiled, by PEFT eager: the same weights).
Variants: compiled base (``torch.compile`` of the base model's forward, Inductor, no adapter),
lora_fx branch and fold (``lora_fx.backend(adapter, mode=...)``, Inductor), PEFT eager, PEFT
compiled (``torch.compile`` of the PeftModel's forward, Inductor; a failure to compile or run is
written in its column; a compile inside a timed call is flagged). All compiles are ``dynamic=False``.
PEFT's expert ``ParamWrapper`` registers and removes a torch parametrization on the 3-D parameter
around each forward: under torch.compile (torch 2.13, peft 0.21) that graph-breaks and recompiles
frames on every call, so its column is flagged "compiled again while timed" (dynamo's recompile limit
is raised to 64 here; past it those frames run eager).

``batched_mm`` gathers every routed row's expert weights (T k 3 I H floats a layer): at hidden 512 a
4x256 prefill would gather about 21 GiB, so the script refuses past 8 GiB; give it shorter prefills,
e.g. ``--impl batched_mm --prefill 1x32,4x32``.

Each of the groups (branch, fold, PEFT) runs in its own process beside its own compiled base (dynamo's
cache entries per code object stay comparable); inside a process the variants are timed in turn, call
by call, and each figure is the median of ``--reps`` calls (prefill: half, at least 2); ratios are to
that process's compiled base. Before timing, every fold and branch workload's first output is asserted
equal to PEFT eager's logits at atol = rtol = 1e-4 (decode: PEFT over prompt + token, no cache, last
position), so nothing wrong is timed.

FLOPs (arithmetic, per call, all layers; 1 multiply-add = 2 FLOPs): with T tokens in the call, k
experts per token, R = T k routed rows (each token goes to exactly k experts), E experts, rank r,
hidden H, expert intermediate I, L layers, the two expert parameters (in, out) = (H, 2I) and (I, H):

- branch, the update on routed rows only:  L * 2 R r [(H + 2I) + (I + H)]      = L * 2 R r (2H + 3I)
- dense-delta form (PEFT's: every expert's B_e A_e each call):  L * 2 E r [H 2I + I H] = L * 6 E r H I
  (plus E * 3HI additions into W, not counted)
- the base experts' matmuls, for scale:  L * 2 R (H 2I + I H) = L * 6 R H I

Results: benchmarks/results/moe-cpu.md (``--quick``: a file in the temporary directory).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from lora_fx.bench import save_table, script_parser

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
GROUPS = {"branch": ["lora_fx branch"], "fold": ["lora_fx fold"], "peft": ["PEFT eager", "PEFT compiled"]}
COLUMNS = ["lora_fx branch", "lora_fx fold", "PEFT eager", "PEFT compiled"]
QUICK = dict(hidden=64, layers=1, intermediate=112, vocab=128, rank=4, prefill="1x16", decode="2", context=8,
             reps=6)


def build(args, impl: str) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64) if args.hidden >= 256 else 4
    cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=heads,
                        num_key_value_heads=max(1, heads // 4), num_local_experts=args.experts,
                        num_experts_per_tok=args.top_k, max_position_embeddings=4096, sliding_window=None)
    model = MixtralForCausalLM(cfg).eval()
    model.set_experts_implementation(impl)
    return model


def peft_model(model: torch.nn.Module, args):
    import peft

    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=ATTN,
                          target_parameters=EXPERT_PARAMS)
    pm = peft.get_peft_model(model, cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return pm


def workloads(args) -> dict[str, tuple[str, torch.Tensor, torch.Tensor | None]]:
    """name -> (kind, ids, prompt or None)."""
    gen = torch.Generator().manual_seed(2)
    out = {}
    for shape in args.prefill.split(","):
        b, s = (int(x) for x in shape.split("x"))
        out[f"prefill {b}x{s}"] = ("prefill", torch.randint(0, args.vocab, (b, s), generator=gen), None)
    for b in (int(x) for x in args.decode.split(",")):
        out[f"decode b{b} (ctx {args.context})"] = ("decode", torch.randint(0, args.vocab, (b, 1), generator=gen),
                                                   torch.randint(0, args.vocab, (b, args.context), generator=gen))
    return out


def call(model, kind: str, ids: torch.Tensor, prompt: torch.Tensor | None, filler=None):
    """A function running one call of the workload on ``model``, returning its logits; a decode's
    KV cache is filled by ``filler`` (the same weights, eager), or ``model``'s uncompiled forward."""
    from lora_fx.bench import CACHE_KW

    if kind == "prefill":
        return lambda: model(input_ids=ids, use_cache=False).logits
    eager = filler or getattr(model.forward, "_torchdynamo_orig_callable", model.forward)
    first = eager(input_ids=prompt, use_cache=True)
    cache = getattr(first, "cache", None) or first.past_key_values

    def step():
        logits = model(input_ids=ids, **{CACHE_KW: cache}, use_cache=True).logits
        cache.crop(-1)  # back to the prompt length
        return logits

    return step


def compiled(model, be="inductor"):
    model.forward = torch.compile(model.forward, backend=be, dynamic=False)
    return model


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def worker(job: str, args) -> dict:
    import lora_fx

    impl, group = job.split(":")
    torch._dynamo.config.recompile_limit = 64
    torch.set_grad_enabled(False)
    base = build(args, impl)
    pm = peft_model(copy.deepcopy(base), args)
    loads = workloads(args)
    models = {"compiled base": compiled(base)}
    failed, checked, fillers = {}, [], {}
    refs = {}
    for wl, (kind, ids, prompt) in loads.items():
        refs[wl] = pm(input_ids=ids).logits if kind == "prefill" else \
            pm(input_ids=torch.cat([prompt, ids], 1)).logits[:, -1:]
    if group == "peft":
        models["PEFT eager"] = pm
        models["PEFT compiled"] = compiled(copy.deepcopy(pm))
    else:
        # lora_fx runs only compiled (its guard refuses an eager call with the adapter on): the
        # decode's prompt cache is filled by PEFT eager, the same weights
        fillers["lora_fx " + group] = copy.deepcopy(pm)
        model, ads = lora_fx.from_peft(pm)
        be = lora_fx.backend(ads["default"], mode=group)
        models[f"lora_fx {group}"] = compiled(model, be)
    res: dict = {"times": {}, "failed": failed, "checked": checked, "recompiled": {}}
    for wl, (kind, ids, prompt) in loads.items():
        fns = {}
        for name, m in models.items():
            if name in failed:
                continue
            try:
                fn = call(m, kind, ids, prompt, fillers.get(name))
                out = fn()  # compile and warm up
                fn()
            except Exception as e:  # PEFT compiled: written in the table
                if name != "PEFT compiled":
                    raise
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
                continue
            if name.startswith("lora_fx"):
                torch.testing.assert_close(out, refs[wl], atol=1e-4, rtol=1e-4,
                                           msg=lambda m, n=name, w=wl: f"{n} != PEFT eager at {w}: {m}")
                checked.append(f"{name} at {wl}: max |diff| {(out - refs[wl]).abs().max().item():.1e}")
            fns[name] = fn
        reps = max(2, args.reps // 2) if kind == "prefill" else args.reps
        samples = {name: [] for name in fns}
        stats = torch._dynamo.utils.counters["stats"]
        for _ in range(reps):
            for name, fn in fns.items():
                graphs = stats["unique_graphs"]
                samples[name].append(timed(fn))
                if stats["unique_graphs"] != graphs:  # a compile inside a timed call: flagged in the table
                    res["recompiled"].setdefault(wl, []).append(name)
        res["times"][wl] = {name: statistics.median(s) for name, s in samples.items()}
    if group != "peft":
        assert not be.unseen_modules(), f"adapter modules the graph never reached: {be.unseen_modules()}"
    return res


def flops(args, tokens: int) -> dict[str, float]:
    h, i, e, r, k, n = args.hidden, args.intermediate, args.experts, args.rank, args.top_k, args.layers
    rows = tokens * k
    return {"rows": rows, "branch": n * 2 * rows * r * (2 * h + 3 * i), "dense": n * 6 * e * r * h * i,
            "base": n * 6 * rows * h * i}


def run_job(argv: list[str], job: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--worker", job], capture_output=True, text=True,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"[moe] {job} failed (exit {proc.returncode})")
    return json.loads(lines[-1][7:])


def main(argv=None) -> int:
    p = script_parser(__doc__, "moe-cpu.md", hidden=512, layers=2, experts=8, top_k=2, intermediate=0, vocab=1024,
                      rank=16, prefill="1x128,4x256", decode="1,4", context=128, reps=20, impl="grouped_mm")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of the script, ~1 min)")
    given = list(argv if argv is not None else sys.argv[1:])
    args = p.parse_args(given)
    if args.quick:
        for name, value in QUICK.items():
            if f"--{name}" not in given:
                setattr(args, name, value)
        if "--out" not in given:
            args.out = os.path.join(tempfile.gettempdir(), "lora_fx-moe-quick.md")
    args.intermediate = args.intermediate or int(args.hidden * 3.5) // 8 * 8
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return 0
    # one Inductor cache for the run: the base model's graphs compile once for all processes
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="lora_fx_moe_")}
    impls = args.impl.split(",")
    if "batched_mm" in impls:  # it gathers each routed row's expert weights: T k (3 I H) floats a layer
        most = max(ids.numel() for _, ids, _ in workloads(args).values()) * args.top_k * 3 * args.intermediate
        if most * args.hidden * 4 > 8 * 2**30:
            raise SystemExit(f"[moe] batched_mm would gather {most * args.hidden * 4 / 2**30:.0f} GiB of expert "
                             "weights at the largest prefill: give it a smaller --prefill (e.g. 1x32)")
    res: dict = {}
    for impl in impls:
        for group in GROUPS:
            t = time.time()
            res[impl, group] = run_job(given, f"{impl}:{group}", env)
            print(f"[moe] {impl} {group}: done in {time.time() - t:.0f}s", flush=True)
    heads = max(1, args.hidden // 64) if args.hidden >= 256 else 4
    lines = [f"CPU ({os.cpu_count()} cores), fp32; transformers {__import__('transformers').__version__}, "
             f"torch {torch.__version__}, peft {__import__('peft').__version__}. Mixtral hidden {args.hidden}, "
             f"{args.layers} layers, {heads} heads / {max(1, heads // 4)} KV heads, {args.experts} experts top-"
             f"{args.top_k}, expert intermediate {args.intermediate}, vocab {args.vocab}, random weights. Adapter "
             f"(PEFT): r={args.rank}, alpha {2 * args.rank}, on q/k/v/o_proj and experts gate_up_proj / down_proj. "
             f"Median of {args.reps} calls (prefill {max(2, args.reps // 2)}), the variants in turn call by call; "
             f"each ratio to the compiled base of its own process. "
             f"Decode: one new token per row over a {args.context}-token KV cache. Target (issue 27): branch <= "
             "1.10x and fold <= 1.02x the compiled base at prefill.", "",
             "Each cell: time / compiled base (variant ms / base ms).", "",
             "| impl | workload | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for impl in impls:
        for wl in res[impl, "branch"]["times"]:
            cells = []
            for col in COLUMNS:
                r = next(res[impl, g] for g, names in GROUPS.items() if col in names)
                t = r["times"][wl]
                if col in t:
                    again = " (compiled again while timed)" if col in r["recompiled"].get(wl, []) else ""
                    cells.append(f"{t[col] / t['compiled base']:.3f}x ({t[col] * 1e3:.1f} / "
                                 f"{t['compiled base'] * 1e3:.1f} ms){again}")
                else:
                    cells.append(f"failed: {r['failed'].get(col, 'not run')}")
            lines.append(f"| {impl} | {wl} | " + " | ".join(cells) + " |")
    lines += ["", "Routed-update FLOPs of the branch against the dense-delta form (per call, all layers; R = T k "
              "routed rows; branch = L 2 R r (2H + 3I), dense delta = L 6 E r H I, base experts = L 6 R H I):", "",
              "| workload | tokens T | routed rows R | branch update (MFLOP) | dense delta (MFLOP) | branch / dense | "
              "branch / base experts |", "|---|---|---|---|---|---|---|"]
    for wl, (_, ids, _) in workloads(args).items():
        f = flops(args, ids.numel())
        lines.append(f"| {wl} | {ids.numel()} | {f['rows']} | {f['branch'] / 1e6:.2f} | {f['dense'] / 1e6:.2f} | "
                     f"{f['branch'] / f['dense']:.4f} | {f['branch'] / f['base']:.4f} |")
    checked = [c for impl in impls for g in ("branch", "fold") for c in res[impl, g]["checked"]]
    lines += ["", f"Checked equal to PEFT eager (atol = rtol = 1e-4) before timing: {len(checked)} outputs "
              f"(largest |diff| {max(float(c.rsplit(' ', 1)[1]) for c in checked):.1e})."]
    save_table(args.out, __file__, given, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
