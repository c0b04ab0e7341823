"""Benchmark over a quantized base: lora_fx branch vs the compiled quantized base, PEFT as peers.

    python benchmarks/quantized.py                 # NF4 (bitsandbytes) and int8 (torchao), CPU fp32
    python benchmarks/quantized.py --formats nf4,bnb_int8 --reps 12 --runs 3

For each format, one process builds the same Llama-shaped model (GQA, KV heads = heads / 4), loads
it quantized, and times side by side, call by call: the compiled quantized base (Inductor), lora_fx
branch over it, PEFT eager and PEFT under torch.compile on the same quantized base. Each figure is
a median over the calls; ratios are to the compiled quantized base of the same run. Weight memory
is the model's parameters (plus what lora_fx holds) over the dense fp32 model's.
Results: benchmarks/results/quantized-cpu.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

import torch

from lora_fx.bench import (
    PROJ,
    Inputs,
    build,
    compiled_forward,
    in_worker,
    run_worker,
    save_table,
    script_parser,
    timed,
    weights_bytes,
)

VARIANTS = ("compiled base", "lora_fx branch", "lora_fx fold (requantize)", "PEFT eager", "PEFT compiled")


def quantized(fmt: str, dense_dir: str, threshold: float = 6.0):
    """The dense model quantized as users load it: NF4 and bnb_int8 through transformers'
    BitsAndBytesConfig, int8 through torchao's quantize_ (lm_head stays dense in all)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if fmt == "nf4":
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["lm_head"])
        model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=qc, device_map="cpu").eval()
    elif fmt == "bnb_int8":  # LLM.int8(): compiles whole with capture_dynamic_output_shape_ops (see worker)
        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"], llm_int8_threshold=threshold)
        model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=qc, device_map="cpu").eval()
    else:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
                  and fqn != "lm_head")
    return warm(model)


def warm(model):
    """One eager inference call: bitsandbytes repacks its CPU weights then (and again after a
    state_dict() unpacks them, as PEFT's loading does); a compiled graph must see the final shapes."""
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    return model


def worker(fmt: str, args) -> dict:
    import peft

    import lora_fx
    from lora_fx.loading import random_adapter

    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.capture_dynamic_output_shape_ops = True  # bitsandbytes Linear8bitLt's outlier split
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        base = build(args)  # dense, fp32
        dense_bytes = weights_bytes(base)
        base.save_pretrained(os.path.join(tmp, "dense"))
        cfg = lora_fx.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJ)
        random_adapter(base, cfg, seed=0, std=0.02).save(os.path.join(tmp, "adapter"))
        adapter = lora_fx.load_adapter(os.path.join(tmp, "adapter"))
        load = lambda: quantized(fmt, os.path.join(tmp, "dense"), args.int8_threshold)  # noqa: E731
        models, backends = {"compiled base": compiled_forward(load())}, {}
        be = backends["lora_fx branch"] = lora_fx.backend(adapter, mode="branch")
        models["lora_fx branch"] = compiled_forward(load(), be)
        if fmt == "int8":  # opt-in fold over torchao: W' quantized again with the model's config
            from torchao.quantization import Int8WeightOnlyConfig

            fold = backends["lora_fx fold (requantize)"] = lora_fx.backend(adapter, mode="fold",
                                                                           requantize=Int8WeightOnlyConfig())
            models["lora_fx fold (requantize)"] = compiled_forward(load(), fold)
        models["PEFT eager"] = warm(peft.PeftModel.from_pretrained(load(), os.path.join(tmp, "adapter")).eval())
        pm = warm(peft.PeftModel.from_pretrained(load(), os.path.join(tmp, "adapter")).eval())
        pm.forward = torch.compile(pm.forward, dynamic=True)
        models["PEFT compiled"] = pm
        inputs = Inputs(args)
        res = {"format": lora_fx.quantized.module_format(models["PEFT eager"].base_model.model.model.layers[0]
                                                            .mlp.up_proj.base_layer), "times": {}}
        for wl in ("prefill", "decode"):
            fns = {name: inputs.workload(m, wl) for name, m in models.items()}
            for fn in fns.values():  # compile, then the one recompile a cropped KV cache's strides cause
                fn()
                fn()
            samples = {name: [] for name in fns}
            for _ in range(args.reps // 2 if wl == "prefill" else args.reps):
                for name, fn in fns.items():
                    samples[name].append(timed(fn, args))
            res["times"][wl] = {name: statistics.median(s) for name, s in samples.items()}
        res["weights"] = {name: weights_bytes(m, backends.get(name)) / dense_bytes for name, m in models.items()
                          if name in ("compiled base", "lora_fx branch", "lora_fx fold (requantize)")}
        res["weights"]["dense fp32"] = 1.0
    return res


def table(runs: list[list[dict]], args) -> str:
    """One row per format and variant; ``runs``: each run's results (one per format). With several
    runs, the median over runs of each run's ratio, and [min - max] over runs."""
    lines = [f"CPU fp32 compute, Llama hidden {args.hidden}, {args.layers} layers, GQA, vocab {args.vocab}, "
             f"r={args.rank} on 7 projections; prefill {args.seq} tokens, decode batch 1 after {args.seq}; "
             f"ratio to the compiled quantized base of the same run (median per call; {len(runs)} run(s)"
             + (": median over runs [min - max]" if len(runs) > 1 else "") + ").", "",
             "| base | variant | prefill | decode | weight memory vs dense fp32 |", "|---|---|---|---|---|"]

    def cell(ratios: list[float]) -> str:
        med = statistics.median(ratios)
        return f"{med:.3f}x" + (f" [{min(ratios):.3f} - {max(ratios):.3f}]" if len(ratios) > 1 else "")

    for i, r in enumerate(runs[0]):
        for name in (v for v in VARIANTS if v in r["times"]["prefill"]):
            cells = [cell([run[i]["times"][wl][name] / run[i]["times"][wl]["compiled base"] for run in runs])
                     for wl in ("prefill", "decode")]
            mem = r["weights"].get(name)
            lines.append(f"| {r['format']} | {name} | {cells[0]} | {cells[1]} | "
                         + (f"{mem:.3f}x" if mem is not None else "") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = script_parser(__doc__, "quantized-cpu.md", formats="nf4,int8", hidden=512, layers=4, vocab=8192, rank=16,
                      seq=128, reps=16, device="cpu", new_tokens=8)
    p.add_argument("--int8-threshold", type=float, default=6.0,
                   help="bnb_int8: LLM.int8()'s outlier threshold (0: no outlier columns, one int8 GEMM)")
    p.add_argument("--runs", type=int, default=1, help="repeat every format's process; the table gives the spread")
    args = p.parse_args(argv)
    if run_worker(args, worker):
        return 0
    given = list(argv or sys.argv[1:])
    runs = [[in_worker(__file__, given, fmt) for fmt in args.formats.split(",")]  # one process per format
            for _ in range(args.runs)]
    save_table(args.out, __file__, given, table(runs, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
