"""Cold compile of a model whose blocks dynamo shares one graph, against compiling the whole model.

    python benchmarks/regional.py [--models flux,llama] [--blocks 8]

Each variant runs in its own process with Inductor's caches off: the first call's time (dynamo,
the lora_fx rewrite, Inductor) and how many graphs the backend got. Variants: the whole model
compiled, and the repeated blocks compiled one by one (diffusers' ``compile_repeated_blocks()`` for
a Flux transformer; ``layer.compile()`` per decoder layer for a Llama, without a KV cache), each
with Inductor alone and with a lora_fx branch backend (r=16 on the attention and MLP projections
of every block). The median of 5 later calls shows what each costs once compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _flux(blocks: int):
    import diffusers
    import torch

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=max(1, blocks // 4), num_single_layers=blocks,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
        axes_dims_rope=[8, 12, 12]).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 256, 16, generator=g), encoder_hidden_states=torch.randn(1, 32, 64,
                  generator=g), pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(256, 3), txt_ids=torch.zeros(32, 3), return_dict=False)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.2"]
    return model, inputs, targets, lambda be: model.compile_repeated_blocks(backend=be)


def _llama(blocks: int):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=896,
                                               num_hidden_layers=blocks, num_attention_heads=8,
                                               num_key_value_heads=2)).eval()
    inputs = dict(input_ids=torch.randint(0, 1024, (1, 128), generator=torch.Generator().manual_seed(1)),
                  use_cache=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return model, inputs, targets, lambda be: [layer.compile(backend=be) for layer in model.model.layers]


def worker(name: str, variant: str, blocks: int) -> dict:
    import torch

    import lora_fx

    model, inputs, targets, regional = {"flux": _flux, "llama": _llama}[name](blocks)
    if variant.endswith("lora_fx"):
        ad = lora_fx.init_adapter(model, lora_fx.LoraConfig(r=16, lora_alpha=16, target_modules=targets), seed=0)
        be = lora_fx.backend(ad, mode="branch")
    else:
        be = "inductor"
    if variant.startswith("whole"):
        model = torch.compile(model, backend=be)
    else:
        regional(be)
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs)
        cold = time.perf_counter() - start
        warm = []
        for _ in range(5):
            start = time.perf_counter()
            model(**inputs)
            warm.append(time.perf_counter() - start)
        warm = sorted(warm)[2]  # median of 5 calls
    graphs = len(be.reports) if not isinstance(be, str) else None
    return {"cold_s": cold, "warm_ms": warm * 1e3, "graphs": graphs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flux,llama")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.blocks)))
        return
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    rows = []
    for name in args.models.split(","):
        for variant in ("whole inductor", "whole lora_fx", "regional inductor", "regional lora_fx"):
            out = subprocess.run([sys.executable, __file__, "--worker", name, variant, "--blocks", str(args.blocks)],
                                 capture_output=True, text=True, env=env, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            rows.append((name, variant, r))
            print(f"{name:6} {variant:18} cold {r['cold_s']:6.1f} s   warm {r['warm_ms']:7.1f} ms   "
                  f"graphs {r['graphs'] if r['graphs'] is not None else '-'}", flush=True)
    print()
    print("| model | compile | Inductor alone: cold | lora_fx branch: cold | lora_fx graphs | warm call, lora_fx |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = {v: x for n, v, x in rows if n == name}
        for kind in ("whole", "regional"):
            a, b = r[f"{kind} inductor"], r[f"{kind} lora_fx"]
            print(f"| {name} ({args.blocks} blocks) | {kind} | {a['cold_s']:.1f} s | {b['cold_s']:.1f} s | "
                  f"{b['graphs']} | {b['warm_ms']:.1f} ms |")


if __name__ == "__main__":
    main()
