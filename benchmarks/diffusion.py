"""One denoising step of a small UNet and a small Flux DiT with a LoRA: lora_fx branch and fold over
the compiled base, diffusers + PEFT eager and compiled as peers.

    python benchmarks/diffusion.py                 # both models, CPU fp32
    python benchmarks/diffusion.py --models unet --reps 10

Each model runs in its own process: random weights from a config, a random LoRA (r=16; the UNet's
on attention and ResNet convs, the DiT's on attention and MLP projections) saved by the pipeline's
``save_lora_weights`` and loaded back the way each variant's users load it (lora_fx:
``load_diffusers_lora``; diffusers: ``load_lora_adapter``). Calls are timed side by side, one of
each variant per round; each figure is the median step time over the rounds, as a ratio to the
compiled base of the same run. Results: benchmarks/results/diffusion-cpu.md.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time

import torch

from lora_fx.bench import in_worker, run_worker, save_table, script_parser

VARIANTS = ("compiled base", "lora_fx branch", "lora_fx fold", "diffusers+PEFT eager", "diffusers+PEFT compiled")


def unet():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    model = UNet2DConditionModel(block_out_channels=(64, 128), layers_per_block=1, sample_size=32, in_channels=4,
                                 out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
                                 attention_head_dim=8, norm_num_groups=32)
    inputs = (torch.randn(2, 4, 32, 32), torch.tensor([10, 20]), torch.randn(2, 16, 128))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"]
    return model, lambda m: m(*inputs).sample, StableDiffusionPipeline, "unet", targets


def flux():
    from diffusers import FluxPipeline, FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                                   pooled_projection_dim=128, axes_dims_rope=[8, 12, 12])
    img, txt = 256, 16
    inputs = dict(hidden_states=torch.randn(1, img, 16), encoder_hidden_states=torch.randn(1, txt, 128),
                  pooled_projections=torch.randn(1, 128), timestep=torch.tensor([0.5]), img_ids=torch.zeros(img, 3),
                  txt_ids=torch.zeros(txt, 3), return_dict=False)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2"]
    return model, lambda m: m(**inputs)[0], FluxPipeline, "transformer", targets


def worker(name: str, args) -> dict:
    import peft
    from peft.utils import get_peft_model_state_dict

    import lora_fx

    torch.manual_seed(0)
    base, step, pipeline, prefix, targets = {"unet": unet, "flux": flux}[name]()
    base.eval()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        lc = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=False, target_modules=targets)
        trained = copy.deepcopy(base)
        trained.add_adapter(lc)
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.02)
        pipeline.save_lora_weights(tmp, **{f"{prefix}_lora_layers": get_peft_model_state_dict(trained),
                                           f"{prefix}_lora_adapter_metadata": lc.to_dict()})
        adapter = lora_fx.load_diffusers_lora(base, tmp)
        models = {"compiled base": torch.compile(copy.deepcopy(base))}
        for mode in ("branch", "fold"):
            models[f"lora_fx {mode}"] = torch.compile(copy.deepcopy(base), backend=lora_fx.backend(adapter, mode=mode))
        eager = copy.deepcopy(base)
        eager.load_lora_adapter(tmp, prefix=prefix, weight_name="pytorch_lora_weights.safetensors")
        models["diffusers+PEFT eager"] = eager
        models["diffusers+PEFT compiled"] = torch.compile(copy.deepcopy(eager))
        compile_s = {}
        for label, m in models.items():
            t0 = time.perf_counter()
            step(m)
            compile_s[label] = time.perf_counter() - t0
        samples = {label: [] for label in models}
        for _ in range(args.reps):
            for label, m in models.items():
                t0 = time.perf_counter()
                step(m)
                samples[label].append(time.perf_counter() - t0)
    convs = sum(bool(w.kernel) for w in adapter.modules.values())
    return {"model": name, "modules": len(adapter.modules), "convs": convs,
            "median": {k: statistics.median(v) for k, v in samples.items()},
            "spread": {k: (min(v), max(v)) for k, v in samples.items()}, "first_call_s": compile_s}


def table(results: list[dict], args) -> str:
    lines = [f"CPU fp32, r={args.rank}, one denoising step (a forward), median of {args.reps} rounds; ratio to the "
             "compiled base of the same run (min-max of the per-call ratios' extremes in brackets); first call "
             "(compile) in seconds.", "",
             "| model | LoRA'd modules (convs) | variant | step | ratio | first call |", "|---|---|---|---|---|---|"]
    for r in results:
        base = r["median"]["compiled base"]
        for v in VARIANTS:
            lo, hi = r["spread"][v]
            lines.append(f"| {r['model']} | {r['modules']} ({r['convs']}) | {v} | {r['median'][v] * 1e3:.1f} ms | "
                         f"{r['median'][v] / base:.3f}x [{lo / base:.2f}-{hi / base:.2f}] | "
                         f"{r['first_call_s'][v]:.1f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = script_parser(__doc__, "diffusion-cpu.md", models="unet,flux", rank=16, reps=20).parse_args(argv)
    if run_worker(args, worker):
        return 0
    given = list(argv or sys.argv[1:])
    results = [in_worker(__file__, given, name) for name in args.models.split(",")]  # one process per model
    save_table(args.out, __file__, given, table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
