"""Show what Inductor generates for lora_fx's branch and fold modes, and check the numbers.

    python benchmarks/inductor_code.py [--device cuda --dtype bfloat16] [--max-autotune] [--out code.txt]

Compiles a decode step (batch 1, one token, KV cache) of the benchmark's Llama for the compiled
base, fold and branch; prints the matmul calls and generated kernels of each, whether the LoRA
add lands in a GEMM epilogue, and the largest difference from the eager reference.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys

import torch
from torch._inductor.utils import run_and_get_code

import lora_fx
from lora_fx import bench


def summarize(code: str) -> dict:
    return {
        "extern matmuls": len(re.findall(r"extern_kernels\.(?:mm|addmm|bmm|baddbmm)\(", code)),
        "template GEMMs (epilogue-capable)": len(re.findall(r"triton_tem_fused|cpp_fused_.*gemm|template", code)),
        "generated kernels": len(set(re.findall(r"(?:triton|cpp)_(?:poi|red|per|tem)?_?fused_\w+", code))),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-autotune", action="store_true")
    p.add_argument("--out", help="write the generated code here")
    a = p.parse_args(argv)
    args = bench.parse(["--device", a.device, "--dtype", a.dtype, "--hidden", str(a.hidden), "--layers",
                        str(a.layers)])
    if a.max_autotune:
        torch._inductor.config.max_autotune = True
    torch._dynamo.config.recompile_limit = 64
    import tempfile

    out = []
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        base = bench.build(args)
        adapter = bench.make_adapter(base, args, 0, tmp + "/a")
        inputs = bench.Inputs(args)
        ids = inputs.prefill[:, :16]
        with lora_fx.apply_lora(base, adapter):
            want = base(input_ids=ids, use_cache=False).logits.float()
        for name, backend in (("compiled base", None), ("fold", lora_fx.backend(adapter, mode="fold")),
                              ("branch", lora_fx.backend(adapter, mode="branch"))):
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            model.forward = torch.compile(model.forward, backend=backend or "inductor")
            got, code = run_and_get_code(lambda m=model: m(input_ids=ids, use_cache=False).logits.float())
            text = "\n".join(code)
            err = (got - want).abs().max().item() if name != "compiled base" else float("nan")
            line = f"{name:14s} {summarize(text)}  max |lora_fx - eager reference| = {err:.3g}"
            print(line, flush=True)
            out.append(f"# ===== {name} =====\n{text}")
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
