"""diffusers pipelines with LoRAs through lora_fx: ``compile_pipeline`` and the pipeline-level loader,
against diffusers' own ``load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` on the same pipeline.

A tiny random-weight Stable Diffusion pipeline (CLIP text encoder with a word-level tokenizer
written to disk, UNet, VAE, DDIM) and LoRA files holding UNet and text-encoder tensors, saved by
the pipeline's ``save_lora_weights`` as diffusers' training scripts save them. The pipeline's
output is compared as latents (``output_type="latent"``).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lora_fx

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> diffusers.StableDiffusionPipeline:
    d = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).eval()
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=8).eval()
    p = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def saved_pipeline_lora(pipe, directory, seed: int, rank: int, alpha: int, unet_targets=UNET_TARGETS) -> str:
    """A random LoRA on the UNet and the text encoder, saved by ``save_lora_weights``."""
    from peft.utils import get_peft_model_state_dict

    layers = {}
    for component, targets in (("unet", unet_targets), ("text_encoder", TEXT_TARGETS)):
        model = copy.deepcopy(getattr(pipe, component))
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        model = peft.inject_adapter_in_model(config, model)  # as the training scripts' add_adapter does
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
        layers[f"{component}_lora_adapter_metadata"] = config.to_dict()
    diffusers.StableDiffusionPipeline.save_lora_weights(str(directory), **layers)
    return str(directory)


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("loras")
    return {"a": saved_pipeline_lora(pipe, d / "a", 1, rank=4, alpha=8),
            "b": saved_pipeline_lora(pipe, d / "b", 2, rank=8, alpha=4, unet_targets=["to_q", "to_v", "conv2"])}


def latents(pipe, **kw) -> torch.Tensor:
    with torch.no_grad():
        return pipe("a cat", num_inference_steps=2, height=8, width=8, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kw).images


def graphs(handle) -> int:
    return sum(len(be.reports) for be in handle.backends.values())


def diffusers_with_loras(pipe, loras: dict[str, str]):
    """The pipeline as ``load_lora_weights`` leaves it. The UNet half goes through diffusers'
    ``load_lora_adapter``; the text encoder half through PEFT itself (``inject_adapter_in_model`` +
    ``set_peft_model_state_dict``, the config from the file's metadata), because diffusers hands it
    to transformers' ``load_adapter``, which needs a PEFT release newer than the one pinned here.
    diffusers' ``set_adapters`` / ``fuse_lora`` / ``disable_lora`` / scale then act on both."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    oracle = copy.deepcopy(pipe)
    for name, path in loras.items():
        oracle.unet.load_lora_adapter(path, prefix="unet", adapter_name=name,
                                      weight_name="pytorch_lora_weights.safetensors")
        state_dict, *_, metadata = oracle.lora_state_dict(path, return_lora_metadata=True)
        config = {k.removeprefix("text_encoder."): v for k, v in metadata.items() if k.startswith("text_encoder.")}
        inject_adapter_in_model(LoraConfig(**config), oracle.text_encoder, adapter_name=name)
        set_peft_model_state_dict(oracle.text_encoder, {k.removeprefix("text_encoder."): v for k, v in
                                                        state_dict.items() if k.startswith("text_encoder.")},
                                  adapter_name=name)
    oracle.text_encoder.peft_config = {n: None for n in loras}
    return oracle


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_pipeline_handle_matches_diffusers_load_set_adapters_fuse(pipe, loras, mode):
    oracle = diffusers_with_loras(pipe, loras)
    assert oracle.get_active_adapters() == ["b"]
    oracle.set_adapters("b")  # the text encoder too (PEFT leaves the first adapter injected active)
    ours = copy.deepcopy(pipe)
    base = latents(pipe)
    lora = lora_fx.compile_pipeline(ours, loras, mode=mode, inner="aot_eager")
    assert sorted(lora.backends) == ["text_encoder", "unet"]
    assert lora.get_active_adapters() == ["b"]
    torch.testing.assert_close(latents(ours), latents(oracle), atol=1e-4, rtol=1e-4)
    compiled = graphs(lora)
    steps = [(["a", "b"], [0.7, 0.3]), ("a", None), ("b", [0.5]), (["a", "b"], [{"unet": 0.7, "text_encoder": 0.2},
                                                                                 0.3])]
    for names, weights in steps:
        oracle.set_adapters(names, weights)
        lora.set_adapters(names, weights)
        want = latents(oracle)
        assert (want - base).abs().max() > 1e-3, "the LoRAs must change the latents"
        torch.testing.assert_close(latents(ours), want, atol=1e-4, rtol=1e-4)
    # diffusers' per-call strength, read where diffusers reads it (UNet kwargs, encode_prompt's lora_scale)
    kw = {"cross_attention_kwargs": {"scale": 0.5}}
    torch.testing.assert_close(latents(ours, **kw), latents(oracle, **kw), atol=1e-4, rtol=1e-4)
    oracle.disable_lora()
    lora.disable_lora()
    torch.testing.assert_close(latents(ours), latents(oracle), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(latents(ours), base, atol=1e-5, rtol=1e-5)
    oracle.enable_lora()
    lora.enable_lora()
    oracle.set_adapters(["a", "b"], [0.7, 0.3])
    lora.set_adapters(["a", "b"], [0.7, 0.3])
    unet_weights = {k: v.clone() for k, v in lora.originals["unet"].state_dict().items()}
    oracle.fuse_lora()
    lora.fuse_lora()
    torch.testing.assert_close(latents(ours), latents(oracle), atol=1e-4, rtol=1e-4)
    with pytest.raises(lora_fx.LoraFxError, match="unfuse_lora"):
        lora.set_adapters("a")
    with pytest.raises(lora_fx.LoraFxError, match="fused"):
        latents(ours, **kw)
    lora.unfuse_lora()
    for k, v in lora.originals["unet"].state_dict().items():
        assert torch.equal(v, unet_weights[k]), f"{k}: not put back bit for bit"
    oracle.unfuse_lora()
    torch.testing.assert_close(latents(ours), latents(oracle), atol=1e-4, rtol=1e-4)
    assert graphs(lora) == compiled, "switching, weighting, scaling, disabling or fusing recompiled"


def test_pipeline_loader_returns_every_component_and_a_model_refuses_the_other_half(pipe, loras):
    parts = lora_fx.load_diffusers_lora(pipe, loras["a"])
    assert sorted(parts) == ["text_encoder", "unet"]
    assert set(parts["text_encoder"].modules) == {f"text_model.encoder.layers.{i}.self_attn.{t}" if hasattr(
        pipe.text_encoder, "text_model") else f"encoder.layers.{i}.self_attn.{t}" for i in (0, 1) for t in TEXT_TARGETS}
    with pytest.raises(lora_fx.AdapterConfigError, match="text_encoder"):
        lora_fx.load_diffusers_lora(pipe.unet, loras["a"])
    unet_only = lora_fx.load_diffusers_lora(pipe.unet, loras["a"], drop=("text_encoder",))
    assert set(unet_only.modules) == set(parts["unet"].modules)
    no_text_encoder = copy.copy(pipe)
    no_text_encoder.text_encoder = None
    with pytest.raises(lora_fx.AdapterConfigError, match="text_encoder: .* None"):
        lora_fx.load_diffusers_lora(no_text_encoder, loras["a"])


def test_a_backend_refuses_a_pipeline_diffusers_gave_loras(pipe, loras):
    loaded = diffusers_with_loras(pipe, {"a": loras["a"]})
    adapter = lora_fx.load_diffusers_lora(pipe, loras["b"])["unet"]
    loaded.unet = torch.compile(loaded.unet, backend=lora_fx.backend(adapter, inner="aot_eager"))
    with pytest.raises(lora_fx.LoraFxError, match="unload_lora_weights"):
        latents(loaded)


def test_a_plain_backend_refuses_the_per_call_scale(pipe, loras):
    ours = copy.deepcopy(pipe)
    adapter = lora_fx.load_diffusers_lora(pipe, loras["a"])["unet"]
    be = lora_fx.backend(adapter, inner="aot_eager")
    ours.unet = torch.compile(ours.unet, backend=be)
    latents(ours, cross_attention_kwargs={"scale": 1.0})
    with pytest.raises(lora_fx.LoraFxError, match="compile_pipeline"):
        latents(ours, cross_attention_kwargs={"scale": 0.5})
