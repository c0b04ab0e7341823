"""lora_fx on torch.distributed: FSDP2 (``fully_shard``) with 2 gloo ranks on CPU, spawned by the test.

Each rank trains a tiny Llama's adapter through the compiled graph on its half of the batch; the
same steps in one process on the whole batch are the reference (FSDP2 averages the gradients over
ranks, as one process averaging over the whole batch does).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import VOCAB, tiny_model

import lora_fx
from lora_fx import LoraConfig
from lora_fx.loading import random_adapter

STEPS, WORLD = 3, 2
TARGETS = ["q_proj", "v_proj", "down_proj", "gate_proj", "embed_tokens"]


def _adapter():
    return random_adapter(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), seed=3, std=0.1)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, VOCAB, (2 * WORLD, 6), generator=g) for _ in range(STEPS)]


def _train(model, be, batches, rank: int | None, **kw) -> list[float]:
    compiled = torch.compile(model, backend=be)
    # SGD: its step is proportional to the gradient, so a gradient reduced with the wrong scale (a sum
    # for a mean, a missing reduction) shows in the adapter; AdamW's normalized step would hide it
    opt = torch.optim.SGD(be.parameters(), lr=0.5)
    losses = []
    for ids in batches:
        ids = ids if rank is None else ids.chunk(WORLD)[rank]
        loss = compiled(input_ids=ids, labels=ids, **kw).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = tiny_model("llama")
        be = lora_fx.backend(_adapter(), mode="branch", inner="aot_eager")
        be.attach(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        a = model.model.layers[0].self_attn.q_proj.lora_fx_A
        sharded = type(a).__name__ == "DTensor" and a.to_local().shape[0] < a.shape[0]
        losses = _train(model, be, _batches(), rank)
        unseen = be.unseen_modules()
        for loss in losses:  # the mean over ranks is the whole batch's loss
            dist.all_reduce(loss)
        trained = be.trained_adapter()  # a collective: every rank gathers
        # after training: swap, set_scale and disable on every rank, against the eager reference
        other = random_adapter(tiny_model("llama"), LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"]), seed=9)
        ids = _batches()[0].chunk(WORLD)[rank]
        reference = tiny_model("llama")
        errors = {}
        compiled = torch.compile(model, backend=be)
        with torch.no_grad():
            be.swap(other)
            errors["swap"] = _err(compiled(input_ids=ids).logits, lora_fx.lora_forward(reference, other, input_ids=ids))
            be.set_scale(0.5)
            errors["set_scale"] = _err(compiled(input_ids=ids).logits,
                                       lora_fx.lora_forward(reference, other.scaled(0.5), input_ids=ids))
            with be.disabled():
                errors["disable"] = _err(compiled(input_ids=ids).logits, reference(input_ids=ids).logits)
        late = lora_fx.backend(_adapter(), mode="branch", inner="aot_eager")
        try:
            late.attach(model)
            refused = ""
        except lora_fx.GraphRewriteError as e:
            refused = str(e)
        torch.save({"losses": [float(x) / WORLD for x in losses], "sharded": sharded, "unseen": unseen,
                    "adapter": trained.state_dict(), "errors": errors, "refused": refused},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _tp_plan(model) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        plan.update({p + "self_attn.q_proj": ColwiseParallel(), p + "self_attn.k_proj": ColwiseParallel(),
                     p + "self_attn.v_proj": ColwiseParallel(), p + "self_attn.o_proj": RowwiseParallel(),
                     p + "mlp.gate_proj": ColwiseParallel(), p + "mlp.up_proj": ColwiseParallel(),
                     p + "mlp.down_proj": RowwiseParallel()})
    return plan


def _tp_model(be, mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    torch.manual_seed(0)
    model = tiny_model("llama")
    be.attach(model)
    parallelize_module(model, mesh, _tp_plan(model))
    return model


def _tp_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        ids = _batches()[0]
        second = lora_fx.load_adapter(os.path.join(out_dir, "second"))
        out = {}
        for mode in ("branch", "fold"):
            be = lora_fx.backend(_adapter(), mode=mode, inner="aot_eager")
            compiled = torch.compile(_tp_model(be, mesh), backend=be)
            with torch.no_grad():
                out[f"{mode} logits"] = compiled(input_ids=ids).logits
                be.swap(second)  # each rank keeps its shard of the full PEFT adapter
                out[f"{mode} swapped"] = compiled(input_ids=ids).logits
                compiled.model.layers[0].self_attn.q_proj.weight.mul_(1.5)  # in place on the DTensor
                out[f"{mode} edited"] = compiled(input_ids=ids).logits
        be = lora_fx.backend(_adapter(), mode="branch", inner="aot_eager")
        model = _tp_model(be, mesh)
        out["losses"] = [float(x) for x in _train(model, be, _batches(), None)]
        a = model.model.layers[0].mlp.down_proj.lora_fx_A  # rowwise: A sharded on its input dim
        out["layout"] = (str(a.placements), str(model.model.layers[0].self_attn.q_proj.lora_fx_B.placements))
        out["adapter"] = be.trained_adapter().state_dict()
        # a plan that shards what the adapter cannot follow: a vocab-parallel embedding
        from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

        emb = lora_fx.backend(random_adapter(tiny_model("llama"), LoraConfig(target_modules=["embed_tokens"]), seed=4),
                              mode="branch", inner="aot_eager")
        model = tiny_model("llama")
        emb.attach(model)
        parallelize_module(model, mesh, {"model.embed_tokens": RowwiseParallel()})
        try:
            emb.parameters()
            out["refused"] = ""
        except lora_fx.GraphRewriteError as e:
            out["refused"] = str(e)
        torch.save(out, os.path.join(out_dir, f"tp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_matches_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from cases import Case, peft_adapter

    peft_adapter(Case("second", "llama", dict(target_modules=["q_proj", "down_proj"], r=2, lora_alpha=3)),
                 str(tmp_path / "second"), seed=5)
    mp.spawn(_tp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"tp{r}.pt") for r in range(WORLD)]
    ids = _batches()[0]
    second = lora_fx.load_adapter(str(tmp_path / "second"))
    with torch.no_grad():
        want = lora_fx.lora_forward(tiny_model("llama"), _adapter(), input_ids=ids).logits
        fresh = torch.compile(tiny_model("llama"), backend=lora_fx.backend(second, mode="branch", inner="aot_eager"))
        want_swapped = fresh(input_ids=ids).logits
        edited = tiny_model("llama")
        edited.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
        want_edited = lora_fx.lora_forward(edited, second, input_ids=ids).logits
    assert (want_edited - want_swapped).abs().max() > 1e-3
    assert (want - tiny_model("llama")(input_ids=ids).logits).abs().max() > 1e-2
    torch.manual_seed(0)
    be = lora_fx.backend(_adapter(), mode="branch", inner="aot_eager")
    want_losses = [float(x) for x in _train(tiny_model("llama"), be, _batches(), None)]
    want_ab = be.trained_adapter().state_dict()
    for r in ranks:
        assert r["layout"] == ("(Shard(dim=1),)", "(Shard(dim=0),)")
        assert "model.embed_tokens: tensor parallel over an embedding is not supported" in r["refused"]
        for mode in ("branch", "fold"):
            torch.testing.assert_close(r[f"{mode} logits"], want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(r[f"{mode} swapped"], want_swapped, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(r[f"{mode} edited"], want_edited, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(want_losses), atol=1e-5, rtol=1e-5)
        for k, v in want_ab.items():
            torch.testing.assert_close(r["adapter"][k], v, atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def _err(got, want) -> float:
    want = want.logits if hasattr(want, "logits") else want
    return float((got - want).abs().max())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_training_matches_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(r["sharded"] for r in ranks), "A must be sharded by FSDP2 (a DTensor, a shard per rank)"
    assert all(r["unseen"] == [] for r in ranks), "every targeted module must run in a compiled graph"

    torch.manual_seed(0)
    model = tiny_model("llama")
    be = lora_fx.backend(_adapter(), mode="branch", inner="aot_eager")
    want = [float(x) for x in _train(model, be, _batches(), None)]
    want_ab = be.trained_adapter().state_dict()
    start = _adapter().state_dict()
    assert any((want_ab[k] - start[k]).abs().max() > 1e-3 for k in want_ab), "training must move the adapter"
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(want), atol=1e-5, rtol=1e-5)
        assert r["adapter"].keys() == want_ab.keys()
        for k, v in want_ab.items():
            torch.testing.assert_close(r["adapter"][k], v, atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for k, v in ranks[0]["adapter"].items():
        assert torch.equal(v, ranks[1]["adapter"][k]), f"{k}: the ranks' adapters differ"
    for r in ranks:
        assert all(e < 1e-4 for e in r["errors"].values()), r["errors"]
        assert "call be.attach(model) before fully_shard" in r["refused"]


def test_attach_needs_one_branch_adapter_set():
    model = tiny_model("llama")
    with pytest.raises(lora_fx.GraphRewriteError, match="attach: expected a branch-mode backend with one adapter set"):
        lora_fx.backend({"a": _adapter()}, mode="branch").attach(model)
    be = lora_fx.backend(_adapter(), mode="branch", inner="aot_eager")
    be.attach(model)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_fx_A is be.named_parameters()["model.layers.0.self_attn.q_proj"]["lora_a"]


def _attached_and_run():
    """A tiny Llama with the adapter attached, compiled, after one call: (model, backend, compiled, ids)."""
    model = tiny_model("llama")
    be = lora_fx.backend(_adapter(), mode="branch", inner="aot_eager")
    be.attach(model)
    compiled = torch.compile(model, backend=be)
    ids = _batches()[0]
    with torch.no_grad():
        compiled(input_ids=ids)
    return model, be, compiled, ids


def test_an_attached_module_run_eagerly_gets_its_update_and_gradients():
    # dynamo runs a frame eagerly when it cannot compile it, and callers run the model uncompiled
    # (transformers' generate prefill): a targeted module running there gets its update from the
    # reference math, with the current (trained) A / B, and trains them
    model, be, compiled, ids = _attached_and_run()
    params = be.named_parameters()
    with torch.no_grad():
        for t in params.values():
            t["lora_b"].add_(0.05)  # as a training step would: the eager path reads the current values
    trained = be.trained_adapter()
    want = lora_fx.lora_forward(tiny_model("llama"), trained, input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), want, atol=1e-4, rtol=1e-4)
    model(input_ids=ids, labels=ids).loss.backward()
    compiled_grads = {f: t["lora_a"].grad.clone() for f, t in params.items()}
    for t in params.values():
        t["lora_a"].grad = None
    compiled(input_ids=ids, labels=ids).loss.backward()
    for f, t in params.items():
        torch.testing.assert_close(compiled_grads[f], t["lora_a"].grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), be.disabled():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits)


def test_attached_tensors_are_read_from_their_modules_at_each_call():
    # a wrapper (or load_state_dict(assign=True)) may replace the module's parameter objects:
    # the compiled graphs read whatever the module holds now, without recompiling
    model, be, compiled, ids = _attached_and_run()
    with torch.no_grad():
        key = "model.layers.1.self_attn.q_proj.lora_fx_A"
        new_a = torch.randn_like(model.state_dict()[key])
        model.load_state_dict({key: new_a}, strict=False, assign=True)
        changed = _adapter()
        changed.modules["model.layers.1.self_attn.q_proj"].lora_a = new_a
        torch.testing.assert_close(compiled(input_ids=ids).logits,
                                   lora_fx.lora_forward(tiny_model("llama"), changed, input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def _fsdp_all_linear_worker(rank: int, port: int, out_dir: str) -> None:
    """FSDP2's standard recipe: init_adapter(all-linear), attach, fully_shard per layer and root, the
    whole model compiled with Inductor (FSDP2's hooks break the graph per layer, so dynamo runs one
    graph for several layers: each call binds its layer's A / B). Each rank trains on its half of
    the batch, then again on the whole batch."""
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = {}
        for split in (True, False):
            torch._dynamo.reset()
            model = tiny_model("llama")
            be = lora_fx.backend(lora_fx.load_adapter(os.path.join(out_dir, "init")), mode="branch")  # Inductor
            be.attach(model)
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            # without a KV cache (training), the layers' graphs do not differ by layer index: one graph
            losses = _train(model, be, _batches(), rank if split else None, use_cache=False)
            for loss in losses:
                dist.all_reduce(loss)
            out[split] = {"losses": [float(x) / WORLD for x in losses], "unseen": be.unseen_modules(),
                          "adapter": be.trained_adapter().state_dict(),
                          "graphs": [len(r.modules) for r in be.reports if r.modules]}
        torch.save(out, os.path.join(out_dir, f"all{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.inductor
def test_fsdp2_whole_model_compile_with_an_all_linear_adapter_matches_peft(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import peft

    init = lora_fx.init_adapter(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), seed=2)
    with torch.no_grad():  # B starts at 0 (PEFT's init): give it values, so the first step trains A too
        for w in init.modules.values():
            w.lora_b.copy_(0.1 * torch.randn(w.lora_b.shape, generator=torch.Generator().manual_seed(5)))
    init.save(tmp_path / "init")
    mp.spawn(_fsdp_all_linear_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"all{r}.pt") for r in range(WORLD)]
    # the oracle: PEFT, one process, the whole batch, the same SGD steps
    pm = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "init"), is_trainable=True)
    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    want = []
    for ids in _batches():
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        want.append(float(loss))
    peft_mods = dict(pm.base_model.model.named_modules())
    start = init.state_dict()
    for r in ranks:
        for split in (True, False):
            got = r[split]
            assert got["unseen"] == [], "every targeted module ran in a compiled graph"
            assert got["graphs"] == [7], "one graph for both layers' 7 projections: dynamo reuses it"
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want), atol=1e-5, rtol=1e-5)
            for key, v in got["adapter"].items():
                fqn, role = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
                peft_t = getattr(peft_mods[fqn], "lora_" + role.split(".")[0])["default"].weight
                assert (v - start[key]).abs().max() > 1e-4, f"{key}: training must move it"
                torch.testing.assert_close(v, peft_t.detach(), atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
