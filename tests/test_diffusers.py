"""diffusers models with LoRAs in the forms diffusers saves and loads, against diffusers + PEFT.

A tiny random-weight UNet2DConditionModel (attention and ResNet convs targeted) and a tiny
FluxTransformer2DModel; LoRA files written by the pipelines' ``save_lora_weights`` (PEFT format
inside diffusers' file) and a kohya file (diffusers' converter); the oracle is the model with
``load_lora_adapter`` / ``load_lora_into_unet``, as ``pipe.load_lora_weights`` does.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lora_fx

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
RESNET = ["conv1", "conv2", "conv_shortcut", "proj_in"]


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).eval()


def unet_inputs() -> tuple:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 20]), torch.randn(2, 5, 16, generator=g)


def tiny_flux() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[2, 2, 4]).eval()


def flux_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 16, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([0.5, 0.7]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), return_dict=False)


def saved_lora(base: torch.nn.Module, pipeline: type, component: str, directory, seed: int = 0, **config) -> str:
    """A random LoRA on ``base`` saved by ``pipeline.save_lora_weights``, as diffusers' training scripts do."""
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(base)
    lc = peft.LoraConfig(init_lora_weights=False, **config)
    model.add_adapter(lc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pipeline.save_lora_weights(str(directory), **{f"{component}_lora_layers": get_peft_model_state_dict(model),
                                                  f"{component}_lora_adapter_metadata": lc.to_dict()})
    return str(directory)


def oracle(base: torch.nn.Module, lora, prefix: str) -> torch.nn.Module:
    model = copy.deepcopy(base)
    model.load_lora_adapter(lora, prefix=prefix, adapter_name="x", weight_name="pytorch_lora_weights.safetensors")
    return model


def compiled(base: torch.nn.Module, adapter, mode: str, inner: str = "aot_eager", **kw) -> tuple:
    be = lora_fx.backend(adapter, mode=mode, inner=inner, **kw)
    return torch.compile(copy.deepcopy(base), backend=be), be


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_unet_lora_matches_diffusers(tmp_path, mode):
    base = tiny_unet()
    d = saved_lora(base, diffusers.StableDiffusionPipeline, "unet", tmp_path, r=4, lora_alpha=6,
                   target_modules=ATTENTION + RESNET)
    adapter = lora_fx.load_diffusers_lora(base, d)
    assert any(w.kernel for w in adapter.modules.values()), "conv LoRA must be part of the case"
    x = unet_inputs()
    with torch.no_grad():
        want = oracle(base, d, "unet")(*x).sample
        assert (want - base(*x).sample).abs().max() > 1e-2
        model, _ = compiled(base, adapter, mode)
        torch.testing.assert_close(model(*x).sample, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32)])
def test_lora_file_dtype_follows_the_model_as_diffusers(tmp_path, dtypes):
    """diffusers casts a LoRA to its layers' dtype: a fp16 file on a fp32 UNet computes in fp32,
    a fp32 file on a bf16 UNet in bf16."""
    from safetensors.torch import load_file, save_file

    model_dtype, file_dtype = dtypes
    base = tiny_unet()
    d = saved_lora(base, diffusers.StableDiffusionPipeline, "unet", tmp_path, r=4, lora_alpha=6,
                   target_modules=ATTENTION + RESNET)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({k: v.to(file_dtype) for k, v in load_file(path).items()}, path)
    base = base.to(model_dtype)
    adapter = lora_fx.load_diffusers_lora(base, d)
    assert {w.lora_a.dtype for w in adapter.modules.values()} == {model_dtype}
    x = tuple(t.to(model_dtype) if t.is_floating_point() else t for t in unet_inputs())
    with torch.no_grad():
        want = oracle(base, d, "unet")(*x).sample
        assert (want - base(*x).sample).abs().max() > 1e-2
        model, _ = compiled(base, adapter, "branch")
        tol = 1e-4 if model_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(model(*x).sample, want, atol=tol, rtol=tol)


@pytest.mark.inductor
@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_flux_lora_matches_diffusers(tmp_path, mode):
    base = tiny_flux()
    d = saved_lora(base, diffusers.FluxPipeline, "transformer", tmp_path, r=4, lora_alpha=8,
                   target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out"])
    adapter = lora_fx.load_diffusers_lora(base, d)
    x = flux_inputs()
    with torch.no_grad():
        want = oracle(base, d, "transformer")(**x)[0]
        assert (want - base(**x)[0]).abs().max() > 1e-2
        model, _ = compiled(base, adapter, mode, inner="inductor")
        torch.testing.assert_close(model(**x)[0], want, atol=1e-4, rtol=1e-4)


def test_kohya_lora_is_converted_by_diffusers(tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file

    base = tiny_unet()
    d = saved_lora(base, diffusers.StableDiffusionPipeline, "unet", tmp_path, r=4, lora_alpha=4,
                   target_modules=ATTENTION + ["conv1", "conv2"])
    kohya = convert_state_dict_to_kohya(load_file(f"{d}/pytorch_lora_weights.safetensors"))
    assert all(k.startswith("lora_unet_") for k in kohya)
    sd, alphas, _ = diffusers.StableDiffusionPipeline.lora_state_dict(dict(kohya), return_lora_metadata=True)
    reference = copy.deepcopy(base)
    diffusers.StableDiffusionPipeline.load_lora_into_unet(sd, network_alphas=alphas, unet=reference, adapter_name="k")
    adapter = lora_fx.load_diffusers_lora(base, kohya)
    x = unet_inputs()
    with torch.no_grad():
        want = reference(*x).sample
        assert (want - base(*x).sample).abs().max() > 1e-2
        model, _ = compiled(base, adapter, "branch")
        torch.testing.assert_close(model(*x).sample, want, atol=1e-4, rtol=1e-4)


def test_two_loras_with_different_targets_and_ranks_swap_without_recompiling(tmp_path):
    from torch._dynamo.testing import CompileCounterWithBackend

    base = tiny_unet()
    da = saved_lora(base, diffusers.StableDiffusionPipeline, "unet", tmp_path / "a", 1, r=4, lora_alpha=8,
                    target_modules=ATTENTION)
    db = saved_lora(base, diffusers.StableDiffusionPipeline, "unet", tmp_path / "b", 2, r=8, lora_alpha=4,
                    target_modules=["to_q", "conv1", "conv2"], use_dora=True)
    a, b = lora_fx.load_diffusers_lora(base, da), lora_fx.load_diffusers_lora(base, db)
    assert set(a.modules) != set(b.modules)
    x = unet_inputs()
    be = lora_fx.backend(a, mode="branch", inner="aot_eager", reserve=[b])
    counter = CompileCounterWithBackend(be)
    model = torch.compile(copy.deepcopy(base), backend=counter)
    with torch.no_grad():
        for adapter, d in ((a, da), (b, db), (a, da)):
            be.swap(adapter)
            torch.testing.assert_close(model(*x).sample, oracle(base, d, "unet")(*x).sample, atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1


def test_unknown_diffusers_model_names_the_loader_to_pass():
    with pytest.raises(lora_fx.AdapterConfigError, match="pass loader="):
        lora_fx.load_diffusers_lora(torch.nn.Linear(2, 2), {})


def tiny_flux_blocks() -> torch.nn.Module:
    """A Flux transformer with repeated blocks (2 double-stream, 3 single-stream)."""
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[2, 2, 4]).eval()


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_compile_repeated_blocks_binds_each_blocks_lora(tmp_path, mode):
    """diffusers' ``compile_repeated_blocks``: dynamo compiles one graph per block class and runs it
    for every block of that class; each call binds its block's LoRA. The output equals diffusers +
    PEFT, lora_fx gets no more graphs than a plain regional compile, and swap / set_scale / disable
    recompile nothing."""
    base = tiny_flux_blocks()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out"]
    da = saved_lora(base, diffusers.FluxPipeline, "transformer", tmp_path / "a", 1, r=4, lora_alpha=8,
                    target_modules=targets)
    db = saved_lora(base, diffusers.FluxPipeline, "transformer", tmp_path / "b", 2, r=2, lora_alpha=3,
                    target_modules=targets)
    a, b = lora_fx.load_diffusers_lora(base, da), lora_fx.load_diffusers_lora(base, db)
    x = flux_inputs()
    graphs = []

    def plain(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    regional = copy.deepcopy(base)
    regional.compile_repeated_blocks(backend=plain)
    with torch.no_grad():
        regional(**x)
    torch._dynamo.reset()
    be = lora_fx.backend(a, mode=mode, inner="aot_eager", max_rank=4)
    model = copy.deepcopy(base)
    model.compile_repeated_blocks(backend=be)
    with torch.no_grad():
        want_a, want_b = oracle(base, da, "transformer")(**x)[0], oracle(base, db, "transformer")(**x)[0]
        assert (want_a - base(**x)[0]).abs().max() > 1e-2 and (want_a - want_b).abs().max() > 1e-2
        torch.testing.assert_close(model(**x)[0], want_a, atol=1e-4, rtol=1e-4)
        assert len(graphs) < 5 and len(be.reports) == len(graphs)
        with torch._dynamo.config.patch(error_on_recompile=True):
            be.swap(b)
            torch.testing.assert_close(model(**x)[0], want_b, atol=1e-4, rtol=1e-4)
            be.set_scale(0.5)
            scaled = oracle(base, db, "transformer")
            scaled.set_adapters(["x"], [0.5])
            torch.testing.assert_close(model(**x)[0], scaled(**x)[0], atol=1e-4, rtol=1e-4)
            with be.disabled():
                torch.testing.assert_close(model(**x)[0], base(**x)[0], atol=1e-4, rtol=1e-4)
    assert len(be.reports) == len(graphs)
