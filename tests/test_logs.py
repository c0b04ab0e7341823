"""lora_fx's logs: one INFO record per compiled graph, off unless asked for (LORA_FX_LOGS, set_logs)."""

import logging
import os
import re
import subprocess
import sys

import pytest
import torch

import lora_fx
from lora_fx import LoraConfig, testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import torch, lora_fx
from lora_fx import LoraConfig, testing
torch.manual_seed(0)
model = testing.TinyNet(12, 8, 16, 5, [dict(bias=True, conv1d=False, attention=True)]).eval()
adapter = testing.random_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up"]), seed=0)
be = lora_fx.backend(adapter, mode="branch", inner="aot_eager")
model.forward = torch.compile(model.forward, backend=be)
with torch.no_grad():
    for seq in (5, 7):
        model(torch.randint(0, 12, (2, seq)))
print("graphs", len(be.reports))
"""


@pytest.fixture(autouse=True)
def _logs_off():
    yield
    lora_fx.set_logs("off")


def compile_tiny(mode: str, lengths=(5, 7)) -> lora_fx.LoraBackend:
    """A TinyNet with an adapter on q_proj (LoRA) and up (rank 3), called at ``lengths`` tokens."""
    torch.manual_seed(0)
    model = testing.TinyNet(12, 8, 16, 5, [dict(bias=True, conv1d=False, attention=True)]).eval()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up"], rank_pattern={"up": 3})
    be = lora_fx.backend(testing.random_adapter(model, cfg, seed=0), mode=mode, inner="aot_eager")
    model.forward = torch.compile(model.forward, backend=be)
    with torch.no_grad():
        for seq in lengths:
            model(torch.randint(0, 12, (2, seq)))
    return be


def run_script(**env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "LORA_FX_LOGS"}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT,
                          env={**environ, **env}, timeout=300)


@pytest.mark.parametrize("mode", ["branch", "fold"])
def test_one_info_record_per_compiled_graph(caplog, mode):
    # caplog's handler sits on the root logger: the records reach it by propagation, as they reach
    # an application's logging.basicConfig
    caplog.set_level(logging.INFO, logger="lora_fx")
    be = compile_tiny(mode)
    records = [r for r in caplog.records if r.name == "lora_fx" and r.levelno == logging.INFO]
    assert len(be.reports) == 2 and len(records) == 2  # 5 tokens, then 7 (dynamic)
    for i, (record, report) in enumerate(zip(records, be.reports)):
        what = record.lora_fx
        assert (what.count, what.mode, what.modules, what.ops) == (i + 1, mode, len(report.modules), report.sites)
        assert what.modules == 2 and re.fullmatch(rf"\d+/{i}", what.compile_id)  # dynamo's frame id / recompile
        assert what.frame.startswith("forward (testing.py:")
        assert what.forms == {"linear r=2 LoRA": 1, "linear r=3 LoRA": 1}
        assert what.rewrite_s > 0 and what.compile_s > 0
        message = record.getMessage()
        assert message.startswith(f"graph {i + 1} [{what.compile_id}] forward (testing.py:")
        assert f": {mode}, 2 modules (2 ops), 0 tensors substituted; forms: linear r=2 LoRA x1, linear r=3 LoRA x1; " \
               "rewrite " in message and ", inner compile " in message and message.endswith(" s")


def test_debug_record_lists_each_module(caplog):
    caplog.set_level(logging.DEBUG, logger="lora_fx")
    be = compile_tiny("branch", lengths=(5,))
    debug = [r.getMessage() for r in caplog.records if r.name == "lora_fx" and r.levelno == logging.DEBUG]
    assert len(debug) == 1 and debug[0].startswith("graph 1 __compiled_fn_")
    assert all(f"{fqn}: {what}" in debug[0] for fqn, what in be.reports[0].modules.items())


def test_set_logs_prints_on_stderr_until_turned_off(capsys):
    lora_fx.set_logs("info")
    compile_tiny("branch", lengths=(5,))
    err = capsys.readouterr().err
    assert err.count("lora_fx INFO: graph ") == 1 and re.search(r"lora_fx INFO: graph 1 \[\d+/0\] forward", err)
    assert not logging.getLogger("lora_fx").propagate  # basicConfig's handler does not print it twice
    lora_fx.set_logs("off")
    torch._dynamo.reset()
    compile_tiny("branch", lengths=(5,))
    assert "lora_fx" not in capsys.readouterr().err
    assert logging.getLogger("lora_fx").propagate and logging.getLogger("lora_fx").level == logging.NOTSET


def test_set_logs_refuses_an_unknown_level():
    with pytest.raises(ValueError, match=r"lora_fx logs: expected one of \['0', '1', 'debug', .*found 'loud'"):
        lora_fx.set_logs("loud")


def test_env_var_prints_one_line_per_graph_on_stderr():
    r = run_script(LORA_FX_LOGS="info")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if "lora_fx INFO: graph " in line]
    assert "graphs 2" in r.stdout and len(lines) == 2, r.stderr[-2000:]
    assert "branch, 2 modules (2 ops)" in lines[0] and "inner compile" in lines[1]
    assert "lora_fx DEBUG" not in r.stderr


def test_nothing_is_printed_by_default():
    r = run_script()
    assert r.returncode == 0, r.stderr[-2000:]
    assert "graphs 2" in r.stdout and "lora_fx" not in r.stderr and "graph 1" not in r.stderr


def test_an_unknown_env_value_warns_and_prints_nothing():
    environ = {k: v for k, v in os.environ.items() if k != "LORA_FX_LOGS"}
    r = subprocess.run([sys.executable, "-c", "import lora_fx, logging; print(logging.getLogger('lora_fx').handlers)"],
                       capture_output=True, text=True, cwd=ROOT, env={**environ, "LORA_FX_LOGS": "loud"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LORA_FX_LOGS='loud': lora_fx logs: expected one of" in r.stderr and r.stdout.strip() == "[]"
