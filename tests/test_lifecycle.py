"""A model's whole life: training, disable, swap + recompile, the recompile limit, checkpointing,
moved and edited weights, mixed batches, threads. Each scenario equals the eager reference (or
PEFT), or raises a LoraFxError that says what to do."""

import contextlib
import copy
import dataclasses
import logging
import threading

import peft
import pytest
import torch
from cases import Case, example_ids, logits, peft_adapter, perturb, tiny_model, train

import lora_fx
from lora_fx import LoraConfig, LoraFxError, RecompileLimitError, StaleWeightError, SwapError
from lora_fx.loading import random_adapter

TOL = dict(atol=1e-4, rtol=1e-4)


def adapter(model, targets=("q_proj", "v_proj"), seed=0, **kw):
    return random_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **kw),
                                          seed=seed)


def reference(model, ad, ids, **kw):
    with torch.no_grad():
        return lora_fx.lora_forward(model, ad, input_ids=ids, **kw).logits


def frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("leave", ["disabled", "set_scale", "disable_enable"])
def test_training_survives_disable_and_set_scale(leave):
    model = frozen(tiny_model("llama"))
    be = lora_fx.backend(lora_fx.init_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0),
                         inner="aot_eager")
    opt = torch.optim.SGD(be.parameters(), lr=0.5)
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    train(compiled, opt, ids, 3)
    trained = be.trained_adapter()
    assert sum(w.lora_b.abs().sum() for w in trained.modules.values()) > 0.1, "training moved B"
    with torch.no_grad():
        if leave == "disabled":
            with be.disabled():  # a reference-model pass, as DPO / KL training does
                torch.testing.assert_close(logits(compiled, ids), logits(model, ids), **TOL)
        elif leave == "set_scale":
            be.set_scale(0.5)
            torch.testing.assert_close(logits(compiled, ids), reference(model, trained.scaled(0.5), ids), **TOL)
            be.set_scale(1.0)
        else:
            be.disable()
            be.enable()
        got = logits(compiled, ids)
    for fqn, w in be.trained_adapter().modules.items():
        torch.testing.assert_close(w.lora_b, trained.modules[fqn].lora_b, atol=0, rtol=0)
    torch.testing.assert_close(got, reference(model, trained, ids), **TOL)


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_graph_compiled_while_a_subset_is_active_gets_every_module(mode):
    model = tiny_model("llama")
    full, subset = adapter(model, seed=1), adapter(model, targets=["q_proj"], seed=2)
    be = lora_fx.backend(full, mode=mode, inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    short, long = example_ids(seq=5), example_ids(seq=9)
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled, short), reference(model, full, short), **TOL)
        be.swap(subset)
        torch.testing.assert_close(logits(compiled, long), reference(model, subset, long), **TOL)  # a new graph
        be.swap(full)
        assert (reference(model, full, long) - reference(model, subset, long)).abs().max() > 1e-2
        torch.testing.assert_close(logits(compiled, long), reference(model, full, long), **TOL)
        torch.testing.assert_close(logits(compiled, short), reference(model, full, short), **TOL)


@contextlib.contextmanager
def quiet_logs(how: str):
    """Logging as users quiet torch: dynamo's logs at ERROR, or every warning disabled."""
    if how == "set_logs":
        torch._logging.set_logs(dynamo=logging.ERROR)
    elif how == "logging.disable":
        logging.disable(logging.WARNING)
    try:
        yield
    finally:
        if how == "set_logs":
            torch._logging.set_logs()
        elif how == "logging.disable":
            logging.disable(logging.NOTSET)


@pytest.mark.parametrize("logs", ["default", "set_logs", "logging.disable"])
def test_past_the_recompile_limit_is_an_error_not_the_base_model(logs):
    model = tiny_model("llama")
    ad = adapter(model)
    compiled = torch.compile(model, backend=lora_fx.backend(ad, inner="eager"), dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2, automatic_dynamic_shapes=False), \
            quiet_logs(logs):
        for seq in (3, 4):
            ids = example_ids(seq=seq)
            torch.testing.assert_close(logits(compiled, ids), reference(model, ad, ids), **TOL)
        with pytest.raises(RecompileLimitError, match="recompile_limit"):
            compiled(input_ids=example_ids(seq=5))
        with pytest.raises(RecompileLimitError, match="recompile_limit"):  # every call past it, not the first only
            compiled(input_ids=example_ids(seq=6))
        ids = example_ids(seq=3)  # compiled shapes still run
        torch.testing.assert_close(logits(compiled, ids), reference(model, ad, ids), **TOL)


@pytest.mark.parametrize("logs", ["default", "set_logs"])
def test_other_compiled_functions_keep_dynamos_fallback(logs):
    lora_fx.backend(adapter(tiny_model("llama")), inner="eager")  # the guard is installed
    f = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False), quiet_logs(logs):
        for n in (1, 2, 3):
            assert f(torch.ones(n)).sum() == 2 * n


def test_gradient_checkpointing_training_step_matches_peft(tmp_path):
    case = Case("ckpt", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]))
    base, pm = peft_adapter(case, str(tmp_path))
    for m in (base, pm):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    ids = example_ids(seq=6)
    pm_loss = pm(input_ids=ids, labels=ids).loss
    pm_loss.backward()
    hops = []

    def inner(gm, example_inputs):
        hops.extend(n for n in gm.graph.nodes if n.target is torch.ops.higher_order.tag_activation_checkpoint)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    be = lora_fx.backend(lora_fx.load_adapter(tmp_path), inner=inner)
    params = be.named_parameters()
    compiled = torch.compile(frozen(base), backend=be)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert len(hops) == 2, "each layer is a checkpointed subgraph"
    assert be.unseen_modules() == []
    torch.testing.assert_close(loss, pm_loss, atol=1e-5, rtol=1e-5)
    peft_mods = dict(pm.base_model.model.named_modules())
    for fqn, t in params.items():
        emb = fqn.endswith("embed_tokens")
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        a_want = getattr(peft_mods[fqn], a_name)["default"]
        b_want = getattr(peft_mods[fqn], b_name)["default"]
        a_want, b_want = (a_want.grad, b_want.grad) if emb else (a_want.weight.grad, b_want.weight.grad)
        a_got = t["lora_a"].grad.T if emb else t["lora_a"].grad
        torch.testing.assert_close(a_got, a_want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t["lora_b"].grad, b_want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_graph_breaks_rewrite_each_graph(mode):
    model = tiny_model("llama")
    layer = model.model.layers[1]
    forward = layer.forward

    def broken(*args, **kwargs):
        torch._dynamo.graph_break()
        return forward(*args, **kwargs)

    layer.forward = broken
    ad = adapter(model, targets=["q_proj", "v_proj", "lm_head"])
    be = lora_fx.backend(ad, mode=mode, inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    with torch.no_grad():
        got = logits(compiled, ids)
    assert len(be.reports) > 1, "the graph break gave several graphs"
    assert be.unseen_modules() == []
    torch.testing.assert_close(got, reference(model, ad, ids), **TOL)


def test_unseen_modules_names_what_ran_outside_the_compiled_graphs():
    model = tiny_model("llama")
    ad = adapter(model)
    be = lora_fx.backend(ad, inner="aot_eager")
    model.model.layers[0] = torch.compile(model.model.layers[0], backend=be)  # only layer 0 compiled
    with torch.no_grad():
        model(input_ids=example_ids())
    assert be.unseen_modules() == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_model_to_another_dtype_after_compiling(mode):
    model = tiny_model("llama")
    ad = adapter(model, use_dora=True)
    compiled = torch.compile(model, backend=lora_fx.backend(ad, mode=mode, inner="aot_eager"))
    ids = example_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled, ids), reference(model, ad, ids), **TOL)
        model.to(torch.float64)
        got = logits(compiled, ids)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, reference(model, ad, ids), **TOL)
        model.to(torch.float32)  # back: the first graph runs again, with what it reads intact
        torch.testing.assert_close(logits(compiled, ids), reference(model, ad, ids), **TOL)


@pytest.mark.parametrize("mode", ["branch", "fold"])
@pytest.mark.parametrize("edit", ["load_state_dict", "optimizer_step", "in_place"])
def test_base_weight_edited_after_compiling(mode, edit):
    model = tiny_model("llama")
    ad = adapter(model, targets=["q_proj", "v_proj", "down_proj"], use_dora=mode == "branch")
    compiled = torch.compile(model, backend=lora_fx.backend(ad, mode=mode, inner="aot_eager"))
    ids = example_ids()
    with torch.no_grad():
        compiled(input_ids=ids)
    q = model.model.layers[0].self_attn.q_proj.weight
    if edit == "load_state_dict":
        model.load_state_dict(tiny_model("llama", seed=5).state_dict())
    elif edit == "optimizer_step":
        q.grad = torch.randn_like(q)
        torch.optim.SGD([q], lr=1.0).step()
    else:
        with torch.no_grad():
            q.mul_(3.0)
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled, ids), reference(model, ad, ids), **TOL)


def test_fold_in_place_refuses_a_weight_changed_behind_it():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ad = adapter(model)
    be = lora_fx.backend(ad, mode="fold", inner="aot_eager", inplace=True)
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    with torch.no_grad():
        compiled(input_ids=ids)
        model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
        with pytest.raises(StaleWeightError, match="model.layers.0.self_attn.q_proj") as e:
            compiled(input_ids=ids)
        assert "be.restore()" in str(e.value)
        with pytest.raises(StaleWeightError):
            be.set_scale(0.5)
        be.restore()
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.0)  # a base edit while not merged is the new base
        be.enable()
        torch.testing.assert_close(logits(compiled, ids), reference_after_restore(model, ad, ids, be), **TOL)


@pytest.mark.parametrize("how", ["load_state_dict_assign", "parameter_replaced"])
def test_fold_in_place_refuses_a_weight_replaced_behind_it(how):
    """A new tensor in the model where the merged one was (``load_state_dict(..., assign=True)``,
    a new Parameter) is refused like an edit; once restored, the model's new tensors are the base
    and take the merge."""
    model = tiny_model("llama")
    ad = adapter(model)
    be = lora_fx.backend(ad, mode="fold", inner="aot_eager", inplace=True)
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    other = tiny_model("llama", seed=5)
    with torch.no_grad():
        compiled(input_ids=ids)
        if how == "load_state_dict_assign":
            model.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
        else:
            model.model.layers[1].self_attn.v_proj.weight = torch.nn.Parameter(
                other.model.layers[1].self_attn.v_proj.weight.clone(), requires_grad=False)
        with pytest.raises(StaleWeightError, match="model.layers.1.self_attn.v_proj"):
            compiled(input_ids=ids)
        be.restore()
        base = logits(model, ids)  # the model's new weights, nothing merged
        be.enable()
        got = logits(compiled, ids)
        want = reference_after_restore(model, ad, ids, be)
        assert (want - base).abs().max() > 0.05
        torch.testing.assert_close(got, want, **TOL)
        if how == "load_state_dict_assign":  # the weights the model holds now
            torch.testing.assert_close(base, logits(other, ids), **TOL)


def reference_after_restore(model, ad, ids, be):
    be.restore()
    try:
        return reference(model, ad, ids)
    finally:
        be.enable()


def test_mixed_batch_size_other_than_the_selection_is_an_error():
    model = tiny_model("llama")
    ads = {"a": adapter(model, seed=1), "b": adapter(model, seed=2)}
    be = lora_fx.backend(ads, inner="aot_eager")
    compiled = torch.compile(model, backend=be, dynamic=True)
    with torch.no_grad():
        be.select(["a", "b"])
        with pytest.raises(SwapError, match=r"expected 2 rows \(2 selected\), found a batch of 4.*declare beams"):
            compiled(input_ids=example_ids(batch=4))  # never read as beams unless declared
        be.select(["a", "b"], beams=2)
        compiled(input_ids=example_ids(batch=4))  # two declared beams per row: fine
        with pytest.raises(SwapError, match=r"expected 4 rows \(2 selected x 2 beams\), found a batch of 3"):
            compiled(input_ids=example_ids(batch=3))


def test_swap_from_another_thread_waits_for_the_running_graph():
    model = tiny_model("llama")
    first, second = adapter(model, seed=1), adapter(model, seed=2)
    be = lora_fx.backend(first, inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    with torch.no_grad():
        compiled(input_ids=ids)
        want = {id(first): reference(model, first, ids), id(second): reference(model, second, ids)}
        stop, errors = threading.Event(), []

        def swapper():
            while not stop.is_set():
                for ad in (second, first):
                    be.swap(ad)

        t = threading.Thread(target=swapper)
        t.start()
        try:
            for _ in range(20):
                with be.lock:  # the forward and the check see one adapter
                    got = logits(compiled, ids)
                    active = be.state.adapters.slots[0][0]
                errors += [] if torch.allclose(got, want[id(active)], **TOL) else [id(active)]
        finally:
            stop.set()
            t.join()
    assert not errors


def test_inference_builds_no_autograd_graph_for_the_adapter():
    model = frozen(tiny_model("llama"))
    be = lora_fx.backend(adapter(model), inner="aot_eager")
    out = torch.compile(model, backend=be)(input_ids=example_ids()).logits
    assert not out.requires_grad
    assert all(not p.requires_grad for t in be.state.trainable.values() for p in t.values())


def test_gradients_reach_a_graph_compiled_before_training_started():
    model = frozen(tiny_model("llama"))
    be = lora_fx.backend(adapter(model), inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    compiled(input_ids=ids, labels=ids)  # compiled with A / B not requiring grad
    params = be.parameters()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_model_lacking_a_module_is_an_error_naming_it():
    model = tiny_model("llama")
    ad = adapter(model)
    ad.modules["model.layers.7.self_attn.q_proj"] = ad.modules["model.layers.0.self_attn.q_proj"]
    with pytest.raises(LoraFxError, match="model.layers.7.self_attn.q_proj"):
        lora_fx.backend(ad).attach(model)


def test_peft_disable_adapter_after_training_matches(tmp_path):
    """The trained adapter, saved and loaded by PEFT, gives the compiled model's logits."""
    model = frozen(tiny_model("llama"))
    be = lora_fx.backend(lora_fx.init_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), seed=0),
                         inner="aot_eager")
    opt = torch.optim.SGD(be.parameters(), lr=0.5)
    compiled = torch.compile(model, backend=be)
    ids = example_ids()

    def reference_pass():
        with be.disabled(), torch.no_grad():
            compiled(input_ids=ids)

    train(compiled, opt, ids, 2, between=reference_pass)
    be.trained_adapter().save(tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_model("llama")), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled, ids), logits(pm, ids), **TOL)


def test_reference_pass_between_forward_and_backward_keeps_the_gradients():
    """DPO / KL: policy forward, reference forward under disabled(), then one backward."""
    model = frozen(tiny_model("llama"))
    ad = adapter(model, use_dora=True)
    be = lora_fx.backend(ad, inner="aot_eager")
    params = be.named_parameters()
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    loss = compiled(input_ids=ids, labels=ids).loss
    with be.disabled(), torch.no_grad():
        ref_loss = compiled(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(ref_loss, model(input_ids=ids, labels=ids).loss, **TOL)
    (loss - ref_loss).backward()
    # the same gradients through the eager reference with A / B as leaves
    leaves = {fqn: (w.lora_a.clone().requires_grad_(True), w.lora_b.clone().requires_grad_(True))
              for fqn, w in ad.modules.items()}
    live = copy.copy(ad)
    live.modules = {fqn: dataclasses.replace(w, lora_a=leaves[fqn][0], lora_b=leaves[fqn][1])
                    for fqn, w in ad.modules.items()}
    lora_fx.lora_forward(model, live, input_ids=ids, labels=ids).loss.backward()
    for fqn, (a, b) in leaves.items():
        torch.testing.assert_close(params[fqn]["lora_a"].grad, a.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(params[fqn]["lora_b"].grad, b.grad, atol=1e-5, rtol=1e-5)


def count_graphs(model, compile_blocks):
    """How many graphs dynamo hands a plain backend for ``compile_blocks(backend)``."""
    graphs = []

    def plain(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_blocks(plain)
    with torch.no_grad():
        model(input_ids=example_ids(), use_cache=False)
    torch._dynamo.reset()
    return len(graphs)


@pytest.mark.parametrize("mode", ["branch", "fold", "fold in place", "mixed"])
def test_a_graph_dynamo_reuses_for_another_layer_binds_that_layers_adapter(mode):
    """Regional compilation (``layer.compile``): dynamo compiles one graph and runs it for every
    layer (same code, weights passed as inputs). Each call binds the adapter tensors of the layer
    whose weights it gets: each layer's own update, no more graphs than a plain regional compile,
    and swap / set_scale / disable without a recompile."""
    model = tiny_model("llama")
    eager = copy.deepcopy(model)  # the reference runs uncompiled
    layers = list(model.model.layers)
    n_plain = count_graphs(model, lambda be: [layer.compile(backend=be) for layer in layers])
    first, other = adapter(model, seed=1), adapter(model, seed=2)
    kw = dict(mode="fold" if mode.startswith("fold") else "branch", inplace=mode == "fold in place",
              inner="aot_eager")
    be = lora_fx.backend({"a": first, "b": other} if mode == "mixed" else first, **kw)
    for layer in layers:
        layer.compile(backend=be)
    ids = example_ids()

    def run():
        return model(input_ids=ids, use_cache=False).logits

    def want(ad):
        return reference(eager, ad, ids, use_cache=False)

    with torch.no_grad():
        if mode == "mixed":
            be.select(["a", "b"])
            got = run()
            torch.testing.assert_close(got[:1], want(first)[:1], **TOL)
            torch.testing.assert_close(got[1:], want(other)[1:], **TOL)
            return
        torch.testing.assert_close(run(), want(first), **TOL)
        assert len(be.reports) == n_plain
        assert (want(first) - want(other)).abs().max() > 1e-2
        with torch._dynamo.config.patch(error_on_recompile=True):
            be.swap(other)
            torch.testing.assert_close(run(), want(other), **TOL)
            be.set_scale(0.5)
            torch.testing.assert_close(run(), want(other.scaled(0.5)), **TOL)
            with be.disabled():
                torch.testing.assert_close(run(), eager(input_ids=ids, use_cache=False).logits, **TOL)
            be.set_scale(1.0)
            torch.testing.assert_close(run(), want(other), **TOL)
        assert len(be.reports) == n_plain
    if kw["mode"] == "branch":  # training: each layer's A / B gets its own gradient, as the eager reference
        frozen(model)
        params = be.named_parameters()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        leaves = {fqn: (w.lora_a.clone().requires_grad_(True), w.lora_b.clone().requires_grad_(True))
                  for fqn, w in other.modules.items()}
        live = copy.copy(other)
        live.modules = {fqn: dataclasses.replace(w, lora_a=leaves[fqn][0], lora_b=leaves[fqn][1])
                        for fqn, w in other.modules.items()}
        lora_fx.lora_forward(eager, live, input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for fqn, (a, b) in leaves.items():
            torch.testing.assert_close(params[fqn]["lora_a"].grad, a.grad, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(params[fqn]["lora_b"].grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_a_graph_compiled_for_a_targeted_layer_runs_an_untargeted_one_without_update(mode):
    """layers_to_transform=[0]: the graph compiled for layer 0 runs layer 1 with a zero update."""
    model = tiny_model("llama")
    ad = adapter(model, layers_to_transform=[0])
    eager = copy.deepcopy(model)
    be = lora_fx.backend(ad, mode=mode, inner="aot_eager")
    for layer in model.model.layers:
        layer.compile(backend=be)
    ids = example_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits,
                                   reference(eager, ad, ids, use_cache=False), **TOL)


def test_a_graph_compiled_for_an_untargeted_layer_cannot_be_bound():
    """Only layer 1 targeted: the graph compiled for layer 0 holds no update, so run for layer 1 it
    raises (naming both) instead of returning layer 1's base output; disabled, it is right."""
    model = tiny_model("llama")
    base = copy.deepcopy(model)
    be = lora_fx.backend(adapter(model, targets=["model.layers.1.self_attn.q_proj"]), inner="aot_eager")
    for layer in model.model.layers:
        layer.compile(backend=be)
    ids = example_ids()
    want = (r"compiled for \['model.layers.0.self_attn.q_proj'\] and dynamo now runs it for \['model.layers.1."
            r"self_attn.q_proj'\], which cannot be bound: the graph was compiled for a module the adapter does not")
    with torch.no_grad(), pytest.raises(lora_fx.GraphRewriteError, match=want):
        model(input_ids=ids, use_cache=False)
    with torch.no_grad(), be.disabled():  # the base model: the same graph is right for every layer
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits,
                                   base(input_ids=ids, use_cache=False).logits, **TOL)


@pytest.mark.parametrize("variant", ["fold", "fold in place", "DoRA branch"])
def test_weights_written_through_data_are_taken_by_refresh(variant):
    """``p.data.copy_(new)`` (diffusers' EMAModel.copy_to) bypasses the version counter the
    per-call check reads; ``be.refresh()`` takes the weights as they are: the next call equals the
    eager reference on the new weights. In place, a refresh with nothing written changes nothing
    (the merged weights are not merged again)."""
    model = tiny_model("llama")
    ad = adapter(model, use_dora=variant == "DoRA branch")
    be = lora_fx.backend(ad, mode="branch" if variant == "DoRA branch" else "fold", inplace=variant == "fold in place",
                         inner="aot_eager")
    plain = copy.deepcopy(model)
    compiled = torch.compile(model, backend=be)
    ids = example_ids()
    with torch.no_grad():
        first = logits(compiled, ids)
        torch.testing.assert_close(first, reference(plain, ad, ids), **TOL)
        be.refresh()  # nothing written
        torch.testing.assert_close(logits(compiled, ids), first, **TOL)
        torch.manual_seed(7)
        for layer, new in zip(model.model.layers, plain.model.layers):
            new.self_attn.v_proj.weight.copy_(torch.randn_like(new.self_attn.v_proj.weight))  # the new base weights
            layer.self_attn.v_proj.weight.data.copy_(new.self_attn.v_proj.weight)
        be.refresh()
        want = reference(plain, ad, ids)
        assert (want - first).abs().max() > 1e-2, "the written weights change the output"
        torch.testing.assert_close(logits(compiled, ids), want, **TOL)
        if variant == "fold in place":
            be.restore()  # the written weights are the originals now
            torch.testing.assert_close(model.model.layers[0].self_attn.v_proj.weight,
                                       plain.model.layers[0].self_attn.v_proj.weight, atol=0, rtol=0)


@pytest.mark.parametrize(("arch", "target"), [("gpt2", "wte"), ("gpt2", "lm_head")])
def test_fold_in_place_into_a_tied_weight_is_refused(tmp_path, arch, target):
    """GPT-2's token embedding and output head share one tensor: merging B A into it would apply
    the update to both ops where PEFT applies it to one. Fold in place refuses, naming the shared
    names, and leaves the weight untouched; fold with a separate W' gives PEFT's logits."""
    base, pm = peft_adapter(Case(f"{arch}_{target}", arch, {"target_modules": [target]}), str(tmp_path))
    assert base.get_input_embeddings().weight is base.get_output_embeddings().weight
    ad = lora_fx.load_adapter(str(tmp_path))
    ids = example_ids()
    with torch.no_grad():
        want = logits(pm, ids)
        assert (want - logits(base, ids)).abs().max() > 1e-2
        model, before = copy.deepcopy(base), base.get_input_embeddings().weight.clone()
        compiled = torch.compile(model, backend=lora_fx.backend(ad, mode="fold", inplace=True, inner="aot_eager"))
        with pytest.raises(Exception, match=r"fold in place .* also \['lm_head.weight', "
                                            r"'transformer.wte.weight'\] \(tied weights\)") as e:
            logits(compiled, ids)
        assert isinstance(e.value, lora_fx.GraphRewriteError)
        assert torch.equal(model.get_input_embeddings().weight, before)
        separate = torch.compile(copy.deepcopy(base), backend=lora_fx.backend(ad, mode="fold", inner="aot_eager"))
        torch.testing.assert_close(logits(separate, ids), want, **TOL)


class _ParamLinear(torch.nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.register_parameter(name, torch.nn.Parameter(torch.randn(16, 16) / 4))

    def forward(self, x):
        return x @ getattr(self, self.name).T


class _ParamBlock(torch.nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.p = _ParamLinear(name)

    def forward(self, x):
        return x + torch.tanh(self.p(x))


class _ParamNet(torch.nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_ParamBlock(name) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("mode", ["branch", "fold"])
@pytest.mark.parametrize("name", ["weight", "w"])
@pytest.mark.parametrize("layers", [[0, 1, 2], [1], "suffix"])
def test_lora_on_bare_parameters_under_regional_compilation_is_not_silent(tmp_path, mode, name, layers):
    """LoRA merged into a bare parameter (PEFT's target_parameters): compiled whole, PEFT's output;
    each block compiled on its own, dynamo reuses block 0's graph for blocks 1 and 2: each gets its
    own merged parameter, or, when block 0's graph holds none, an error. An entry
    names every parameter whose full name ends with it, as PEFT matches ("p.weight")."""
    torch.manual_seed(0)
    model = _ParamNet(name).eval()
    targets = [f"p.{name}"] if layers == "suffix" else [f"blocks.{i}.p.{name}" for i in layers]
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_parameters=targets,
                                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    ad = lora_fx.load_adapter(str(tmp_path))
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = pm(x)
        assert (want - model(x)).abs().max() > 1e-2
        whole = torch.compile(copy.deepcopy(model), backend=lora_fx.backend(ad, mode=mode, inner="aot_eager"))
        torch.testing.assert_close(whole(x), want, **TOL)
        be = lora_fx.backend(ad, mode=mode, inner="aot_eager")
        for block in model.blocks:
            block.compile(backend=be)
        if layers == [1]:  # block 0's graph holds no update for block 1
            with pytest.raises(lora_fx.GraphRewriteError, match=r"compiled for \['blocks.0.p'\] and dynamo now runs "
                                                                r"it for \['blocks.1.p'\], which cannot be bound"):
                model(x)
        else:  # each block's own merged parameter
            torch.testing.assert_close(model(x), want, **TOL)


@pytest.mark.parametrize("mode", ["branch", "fold"])
@pytest.mark.parametrize("targets", [["down_proj"], ["model.layers.1.mlp.down_proj"]])
def test_a_graph_break_between_modules_of_a_block_is_not_silent(monkeypatch, mode, targets):
    """A graph break inside LlamaMLP.forward: the graph after it (down_proj) is compiled for layer 0
    and reused for layer 1. Either lora_fx applies each layer's adapter or it raises; it never
    returns another layer's update or none."""
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        torch._dynamo.graph_break()
        return self.down_proj(h)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", forward)
    model = tiny_model("llama")
    ad = adapter(model, targets=targets)
    compiled = torch.compile(model, backend=lora_fx.backend(ad, mode=mode, inner="aot_eager"))
    ids = example_ids()
    with torch.no_grad():
        if targets == ["down_proj"]:  # layer 0's graph runs layer 1 with layer 1's adapter
            torch.testing.assert_close(logits(compiled, ids), reference(model, ad, ids), **TOL)
        else:
            with pytest.raises(lora_fx.GraphRewriteError, match="dynamo now runs it for .* cannot be bound"):
                logits(compiled, ids)


def test_a_tied_head_reading_a_targeted_embedding_in_another_graph_is_applied():
    """embed_tokens targeted, its weight tied to an output head that reads it with a matmul in
    another graph (a graph break between them): that read is the head's, not embed_tokens' forward
    split apart, so nothing is refused and the output equals the reference."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight

    class MatmulHead(torch.nn.Linear):
        def forward(self, h):
            return h @ self.weight.t()

    model.lm_head.__class__ = MatmulHead
    inner = model.model.forward

    def broken(*args, **kwargs):
        out = inner(*args, **kwargs)
        torch._dynamo.graph_break()  # the head in another graph than embed_tokens
        return out

    model.model.forward = broken
    ad = adapter(model, targets=["embed_tokens", "q_proj"])
    be = lora_fx.backend(ad, inner="aot_eager")
    ids = example_ids()
    with torch.no_grad():
        got = logits(torch.compile(model, backend=be), ids)
        want = reference(model, ad, ids)
    with torch.no_grad(), be.disabled():  # the model run uncompiled computes with the adapter too (lora_fx.eager)
        assert (want - logits(model, ids)).abs().max() > 1e-3, "the adapter changes the output"
    torch.testing.assert_close(got, want, **TOL)
    assert len(be.reports) > 1


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_modules_to_save_on_a_tied_weight_is_refused_until_untied(tmp_path, saved, mode):
    """PEFT gives a modules_to_save copy of a tied head (or embedding) to that module alone; the
    graph reads the tied tensor through one input, so substituting it would reach both ops
    (12.1 off PEFT on an effect of 4.4, measured before this was refused). Untied, PEFT's output."""
    import peft
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=[saved], init_lora_weights=False))
    perturb(pm, 1)
    pm.eval().save_pretrained(tmp_path)
    ad = lora_fx.load_adapter(tmp_path)
    path = {"lm_head": "lm_head.weight", "embed_tokens": "model.embed_tokens.weight"}[saved]
    assert path in ad.overrides
    ids = example_ids()
    with torch.no_grad():
        compiled = torch.compile(model, backend=lora_fx.backend(ad, mode=mode, inner="aot_eager"))
        with pytest.raises(lora_fx.GraphRewriteError) as e:
            compiled(input_ids=ids)
        assert f"{path}: the adapter replaces this tensor (modules_to_save), which is also" in str(e.value)
        head = model.lm_head
        head.weight = torch.nn.Parameter(head.weight.clone())  # untied
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=lora_fx.backend(ad, mode=mode, inner="aot_eager"))
        want = logits(pm, ids)
        assert (want - logits(model, ids)).abs().max() > 0.05
        torch.testing.assert_close(logits(compiled, ids), want, **TOL)


@pytest.mark.parametrize("between", ["dora_eval", "set_scale", "swap"])
def test_an_evaluation_under_inference_mode_between_training_steps(tmp_path, between):
    """Derived tensors recomputed by a call under ``torch.inference_mode`` (DoRA's norms after a
    step, the scales after ``set_scale`` / ``swap``) are never inference tensors: training goes on,
    with PEFT's losses and trained logits (PEFT's DoRA magnitude frozen: lora_fx trains A / B)."""
    from peft.tuners.lora import LoraLayer

    case = Case("dora", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                      use_dora=between == "dora_eval"))
    base, pm = peft_adapter(case, str(tmp_path))
    ad = lora_fx.load_adapter(tmp_path)
    for name, p in pm.named_parameters():
        p.requires_grad_("lora_A" in name or "lora_B" in name)
    pm.train()
    be = lora_fx.backend(ad, inner="aot_eager")
    compiled = torch.compile(frozen(base), backend=be)
    ids = example_ids(seq=6)
    opts = [torch.optim.SGD(be.parameters(), lr=0.2), torch.optim.SGD([p for p in pm.parameters() if p.requires_grad],
                                                                      lr=0.2)]
    for step in range(3):
        losses = []
        for model, opt in zip((compiled, pm), opts):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
        with torch.inference_mode():
            if between == "set_scale" and step == 0:
                be.set_scale(0.5)
                for m in pm.modules():
                    if isinstance(m, LoraLayer):
                        m.scale_layer(0.5)
            if between == "swap" and step == 0:
                be.swap(ad)  # the loaded adapter again: A / B back to the file's, PEFT's copy too
                pm.load_state_dict({k: v for k, v in peft_adapter(case, str(tmp_path / "again"))[1].state_dict().items()
                                    if "lora_" in k}, strict=False)
            compiled(input_ids=ids)
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled, ids), logits(pm.eval(), ids), **TOL)


@pytest.mark.parametrize("second", ["branch", "fold", "fold in place", "rewrite", "compiled before the merge"])
def test_a_second_backend_over_weights_merged_in_place_is_refused(second):
    """A backend (or ``rewrite``) meeting weights another backend folded in place would take W' for
    the base: refused, naming the module and the backend to restore; after ``restore()`` it applies."""
    model = tiny_model("llama")
    first, other = adapter(model, seed=1), adapter(model, seed=2)
    ids = example_ids()
    lean = lora_fx.backend(first, mode="fold", inplace=True, inner="aot_eager")
    mode = "fold" if second.startswith("fold") else "branch"
    be = lora_fx.backend(other, mode=mode, inplace=second == "fold in place", inner="aot_eager")
    with torch.no_grad():
        want = reference(model, other, ids)
        if second == "compiled before the merge":  # its graph exists already: the call checks
            twice = torch.compile(model, backend=be)
            torch.testing.assert_close(logits(twice, ids), want, **TOL)
        logits(torch.compile(model, backend=lean), ids)  # merged into the model's weights
        if second == "rewrite":
            gm = torch.fx.symbolic_trace(torch.nn.Sequential(model.model.layers[0].self_attn.q_proj))
            with pytest.raises(lora_fx.GraphRewriteError, match=r"0: its weight holds an adapter that another lora_fx "
                                                                r"backend folded into it in place"):
                lora_fx.rewrite(gm, lora_fx.RewriteConfig(adapter(torch.nn.Sequential(
                    model.model.layers[0].self_attn.q_proj), targets=["0"]), mode="branch"))
            return
        target = twice if second == "compiled before the merge" else torch.compile(model, backend=be)
        with pytest.raises(lora_fx.GraphRewriteError, match=r"model.layers.0.self_attn.q_proj: its weight holds an "
                                                            r"adapter .* call restore\(\) on the in-place backend"):
            logits(target, ids)
        lean.restore()
        torch.testing.assert_close(logits(target, ids), want, **TOL)
