"""Serving more adapters than fit: a registry over compiled slots (lora_fx.pool), vs PEFT per row."""

import random
import threading
import time

import peft
import pytest
import torch
from cases import example_ids, logits, tiny_model

import lora_fx
from lora_fx import LoraConfig, SwapError
from lora_fx.loading import random_adapter
from lora_fx.pool import adapter_bytes

TOL = dict(atol=1e-4, rtol=1e-4)
TARGET_SETS = (["q_proj", "v_proj"], ["o_proj", "up_proj", "down_proj"])


def adapters(model, n, seed=0):
    """``n`` random adapters, ranks 4-16, alternating between two target sets."""
    rng = random.Random(seed)
    return {f"ad{i:03d}": random_adapter(model, LoraConfig(r=rng.choice([4, 8, 12, 16]), lora_alpha=rng.choice([4, 16]),
                                                           target_modules=TARGET_SETS[i % 2]), seed=seed + i, std=0.1)
            for i in range(n)}


class PeftOracle:
    """One PeftModel; each adapter loaded into it the first time a checked row needs it."""

    def __init__(self, dirs):
        self.dirs, self.pm = dirs, None

    def __call__(self, ids, rows):
        for name in {r for r in rows if r is not None}:
            if self.pm is None:
                self.pm = peft.PeftModel.from_pretrained(tiny_model("llama"), self.dirs[name], adapter_name=name).eval()
            elif name not in self.pm.peft_config:
                self.pm.load_adapter(self.dirs[name], adapter_name=name)
        if self.pm is None:
            return logits(tiny_model("llama"), ids)
        return self.pm(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits


def saved(tmp_path, ads):
    dirs = {}
    for name, ad in ads.items():
        ad.save(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    return dirs


def test_churn_from_four_threads_equals_peft_per_row(tmp_path):
    """200 adapters on disk (host cache for ~20), 8 slots, 1,000 Zipf-drawn batches of 3 rows from
    4 threads: every checked row equals PEFT's for its adapter (every batch that started right
    after an eviction, and a random sample of the others), and nothing recompiles."""
    model = tiny_model("llama")
    ads = adapters(model, 200)
    dirs = saved(tmp_path, ads)
    one = adapter_bytes(ads["ad000"])
    be = lora_fx.backend(dirs, slots=8, inner="aot_eager", host_bytes=20 * one)
    compiled = torch.compile(model, backend=be, dynamic=True)
    names = list(dirs)
    weights = [1 / (k + 1) for k in range(len(names))]  # Zipf(1.0)
    ids = [example_ids(batch=3, seq=4, seed=s) for s in range(8)]
    with torch.no_grad():
        for rows in (["ad000", None, "ad001"], [None] * 3):
            with be.using(rows):
                compiled(input_ids=ids[0])
    compiles = len(be.reports)
    results, order, errors = [], threading.Lock(), []
    last = [be.residency.evictions]

    def serve(worker):
        rng = random.Random(worker)
        try:
            with torch.no_grad():
                for n in range(250):
                    rows = [None if rng.random() < 0.1 else rng.choices(names, weights)[0] for _ in range(3)]
                    x = ids[(worker + n) % len(ids)]
                    with be.using(rows):
                        with order:  # a batch that starts after any eviction since the previous one: checked
                            after = be.residency.evictions != last[0]
                            last[0] = be.residency.evictions
                        out = compiled(input_ids=x).logits
                    results.append((x, rows, out, after))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 1000
    assert len(be.reports) == compiles, "no recompile under churn"
    assert be.residency.evictions > 100
    rng = random.Random(0)
    checked = [r for r in results if r[3] or rng.random() < 0.1]
    assert len(checked) >= 100 and sum(r[3] for r in results) > 50
    oracle = PeftOracle(dirs)
    with torch.no_grad():
        for x, rows, out, _ in checked:
            torch.testing.assert_close(out, oracle(x, rows), **TOL)


@pytest.fixture
def pool(tmp_path):
    model = tiny_model("llama")
    ads = adapters(model, 6)
    be = lora_fx.backend(dict(list(ads.items())[:4]), slots=2, inner="aot_eager")
    compiled = torch.compile(model, backend=be, dynamic=True)
    return model, ads, be, compiled, PeftOracle(saved(tmp_path, ads))


def test_register_unregister_and_unknown_names(pool):
    model, ads, be, compiled, oracle = pool
    ids = example_ids(batch=2, seq=4)
    be.register("late", ads["ad004"])
    oracle.dirs["late"] = oracle.dirs["ad004"]
    with torch.no_grad(), be.using(["late", "ad000"]):
        torch.testing.assert_close(logits(compiled, ids), oracle(ids, ["late", "ad000"]), **TOL)
    with pytest.raises(SwapError, match="'late' is already registered"):
        be.register("late", ads["ad005"])
    wide = random_adapter(model, LoraConfig(r=4, target_modules=["k_proj"]), seed=9)
    with pytest.raises(SwapError, match=r"(?s)cannot register 'wide' without recompiling.*k_proj: not in the compiled"):
        be.register("wide", wide)
    with pytest.raises(SwapError, match=r"unknown adapters:\n.*'nope': not registered"):
        be.using(["nope", None]).__enter__()
    with be.using(["ad001"]), pytest.raises(SwapError, match="'ad001' is in use by 1 running using"):
        be.unregister("ad001")
    be.unregister("late")
    assert "late" not in be.resident()
    with pytest.raises(SwapError, match="'late': not registered"):
        be.using(["late"]).__enter__()
    with pytest.raises(SwapError, match="register\\(name, adapter\\)"):
        be.swap({"slot0": ads["ad000"]})


def test_pin_keeps_an_adapter_resident(pool):
    _, _, be, compiled, oracle = pool
    ids = example_ids(batch=1, seq=4)
    be.pin("ad000")
    with torch.no_grad():
        for name in ("ad001", "ad002", "ad003", "ad001"):
            with be.using([name]):
                torch.testing.assert_close(logits(compiled, ids), oracle(ids, [name]), **TOL)
            assert "ad000" in be.resident()
        with pytest.raises(SwapError, match=r"at most 1 distinct adapters in one block \(2 slots, 1 pinned"):
            be.using(["ad001", "ad002"]).__enter__()
        be.unpin("ad000")
        with be.using(["ad001", "ad002"]):
            torch.testing.assert_close(logits(compiled, example_ids(batch=2, seq=4)),
                                       oracle(example_ids(batch=2, seq=4), ["ad001", "ad002"]), **TOL)
        assert "ad000" not in be.resident()


def test_batch_must_match_the_rows_or_declared_beams(pool):
    _, _, be, compiled, oracle = pool
    two, four = example_ids(batch=2, seq=4), example_ids(batch=4, seq=4)
    with torch.no_grad():
        with be.using(["ad000", "ad001"]), pytest.raises(SwapError, match=r"expected 2 rows \(2 selected\), found "
                                                                           "a batch of 4.*declare beams"):
            compiled(input_ids=four)
        with be.using(["ad000", "ad001"], beams=2):
            got = logits(compiled, four)
            with pytest.raises(SwapError, match=r"expected 4 rows \(2 selected x 2 beams\), found a batch of 2"):
                compiled(input_ids=two)
        torch.testing.assert_close(got, oracle(four, ["ad000", "ad000", "ad001", "ad001"]), **TOL)
    with pytest.raises(SwapError, match="beams: expected an int >= 1, found 0"):
        be.using(["ad000"], beams=0).__enter__()


def test_select_on_a_mixed_backend_refuses_an_undeclared_beam_batch():
    model = tiny_model("llama")
    ads = adapters(model, 2)
    be = lora_fx.backend({"a": ads["ad000"], "b": ads["ad001"]}, inner="aot_eager")
    compiled = torch.compile(model, backend=be, dynamic=True)
    with torch.no_grad():
        be.select(["a", "b"])
        with pytest.raises(SwapError, match=r"expected 2 rows \(2 selected\), found a batch of 4"):
            compiled(input_ids=example_ids(batch=4, seq=4))
        be.select(["a", "b"], beams=2)
        got = logits(compiled, example_ids(batch=4, seq=4))
        be.select(["a", "a", "b", "b"])
        torch.testing.assert_close(got, logits(compiled, example_ids(batch=4, seq=4)), **TOL)


def test_swap_none_empties_a_slot():
    model = tiny_model("llama")
    ads = adapters(model, 2)
    be = lora_fx.backend({"a": ads["ad000"], "b": ads["ad001"]}, inner="aot_eager")
    compiled = torch.compile(model, backend=be, dynamic=True)
    ids = example_ids(batch=2, seq=4)
    with torch.no_grad():
        be.select(["a", "b"])
        compiled(input_ids=ids)
        be.swap({"a": None})
        got = logits(compiled, ids)
        ref = tiny_model("llama")  # the same weights, without the backend's eager guard
        torch.testing.assert_close(got[:1], logits(ref, ids[:1]), **TOL)
        torch.testing.assert_close(got[1:], lora_fx.lora_forward(ref, ads["ad001"], input_ids=ids[1:]).logits, **TOL)


def test_all_none_batch_runs_the_graph_without_the_branch(pool):
    model, ads, _, _, oracle = pool
    ran = []

    def inner(gm, example_inputs):
        branch = any(n.meta.get("lora_fx") for n in gm.graph.nodes)  # nodes the rewrite added
        return lambda *args: (ran.append(branch), gm(*args))[1]

    be = lora_fx.backend({"ad000": ads["ad000"], "ad001": ads["ad001"]}, slots=2, inner=inner)
    compiled = torch.compile(model, backend=be, dynamic=True)
    ids = example_ids(batch=2, seq=4)
    with torch.no_grad():
        with be.using([None, None]):
            torch.testing.assert_close(logits(compiled, ids), logits(model, ids), **TOL)
        assert ran and not any(ran), "every graph ran without the branch"
        compiles, ran[:] = len(be.reports), []
        with be.using(["ad001", None]):  # adapters return: the same compile, with the branch
            torch.testing.assert_close(logits(compiled, ids), oracle(ids, ["ad001", None]), **TOL)
        assert ran and all(ran) and len(be.reports) == compiles


def test_a_slot_in_use_is_never_evicted_a_block_waits_or_times_out(pool):
    _, _, be, compiled, oracle = pool
    ids = example_ids(batch=2, seq=4)
    done = []
    with torch.no_grad(), be.using(["ad000", "ad001"]):
        with pytest.raises(SwapError, match=r"expected 1 free slots for \['ad002'\] within 0.2 s, found 0"):
            be.using(["ad002"], timeout=0.2).__enter__()

        def later():
            with torch.no_grad(), be.using(["ad002", "ad003"]):
                done.append(logits(compiled, ids))

        t = threading.Thread(target=later)
        t.start()
        time.sleep(0.3)
        assert not done, "waits while both slots are held"
        torch.testing.assert_close(logits(compiled, ids), oracle(ids, ["ad000", "ad001"]), **TOL)
    t.join(timeout=60)
    torch.testing.assert_close(done[0], oracle(ids, ["ad002", "ad003"]), **TOL)


def test_pool_build_errors():
    with pytest.raises(SwapError, match=r"slots: expected an int >= 1, found 0"):
        lora_fx.backend({}, slots=0)
    with pytest.raises(SwapError, match="expected adapters to build the graphs for"):
        lora_fx.backend({}, slots=2)
