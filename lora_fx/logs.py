"""What the backend compiles, on the ``logging.getLogger("lora_fx")`` logger.

One INFO record per graph the backend compiles: which frame, how many targeted modules it holds,
the mode, the forms written and how long lora_fx's rewrite and the inner compiler took. A DEBUG
record follows with the report's line per module.

Off by default: lora_fx adds no handler and the logger's level is left to the application, so
``logging.basicConfig(level=logging.INFO)`` (or any handler on the root logger) shows the records
as usual. ``LORA_FX_LOGS=info`` (or ``1``; ``debug`` for the details) in the environment, read
when lora_fx is imported, or ``lora_fx.set_logs("info")`` at runtime, prints them on stderr:

    [18:41:49] lora_fx INFO: graph 1 [0/1] wrapped_func (deprecation.py:121): fold, 14 modules (14 ops),
    0 tensors substituted; forms: linear r=8 LoRA x14; rewrite 0.249 s, inner compile 7.0 s

(one line; the frame is the function dynamo compiled, here transformers' decorator of ``forward``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .rewrite import RewriteReport

log = logging.getLogger("lora_fx")
ENV = "LORA_FX_LOGS"
LEVELS = {"1": logging.INFO, "info": logging.INFO, "true": logging.INFO, "debug": logging.DEBUG,
          "warning": logging.WARNING, "0": None, "off": None, "false": None, "": None}
clock = time.perf_counter


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record (a test's or notebook's replacement included)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)
        self.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))

    @property
    def stream(self) -> Any:
        return sys.stderr


_handler: list[logging.Handler] = []  # the handler set_logs attached, if any


def set_logs(level: str | int | bool | None) -> None:
    """Print lora_fx's records on stderr from ``level`` up, or stop printing them.

    Args:
        level: "info" (or 1 / True): one line per compiled graph; "debug": also each graph's
            modules; "warning": warnings only; "off" (or 0 / False / None): remove the handler.
            A ``logging`` level (``logging.INFO``) works too.

    While on, the "lora_fx" logger does not propagate (the lines are not printed twice under
    ``logging.basicConfig``); "off" gives the logger back to the application's configuration.

    Raises:
        ValueError: a level not listed above.
    """
    value = _level(level)
    for h in _handler:
        log.removeHandler(h)
    _handler.clear()
    if value is None:
        log.setLevel(logging.NOTSET)
        log.propagate = True
        return
    _handler.append(_StderrHandler())
    log.addHandler(_handler[0])
    log.setLevel(value)
    log.propagate = False


def _level(level: str | int | bool | None) -> int | None:
    if level is None or isinstance(level, bool):
        return logging.INFO if level else None
    if isinstance(level, int):
        return level or None
    key = str(level).strip().lower()
    if key not in LEVELS:
        raise ValueError(f"lora_fx logs: expected one of {sorted(k for k in LEVELS if k)} or a logging level, "
                         f"found {level!r}")
    return LEVELS[key]


def _from_env() -> None:
    value = os.environ.get(ENV)
    if value is None:
        return
    try:
        set_logs(value)
    except ValueError as e:  # a bad setting must not break the import: say so, print nothing
        warnings.warn(f"{ENV}={value!r}: {e}", stacklevel=2)


@dataclass
class CompiledGraph:
    """One graph the backend compiled, as its record carries it (``record.lora_fx``)."""

    count: int  # this backend's graphs so far, this one included
    compile_id: str  # dynamo's frame id / recompile count, as TORCH_LOGS prints it: "0/1"
    frame: str  # the function dynamo compiled: "forward (modeling_llama.py:391)"
    graph: str  # dynamo's name for the graph: "__compiled_fn_1"
    mode: str
    modules: int
    ops: int
    substituted: int
    forms: dict[str, int] = field(default_factory=dict)  # "linear r=8 LoRA" -> modules written so
    rewrite_s: float = 0.0  # lora_fx's work on the graph (copy, rewrite)
    compile_s: float = 0.0  # the inner compiler

    def __str__(self) -> str:
        where = " ".join(filter(None, (f"[{self.compile_id}]" if self.compile_id else "", self.frame)))
        forms = ", ".join(f"{form} x{n}" for form, n in self.forms.items()) or "none"
        return (f"graph {self.count}{' ' + where if where else ''}: {self.mode}, {self.modules} modules "
                f"({self.ops} ops), {self.substituted} tensors substituted; forms: {forms}; "
                f"rewrite {_seconds(self.rewrite_s)}, inner compile {_seconds(self.compile_s)}")


def _seconds(s: float) -> str:
    return f"{s:.3f} s" if s < 1 else f"{s:.1f} s"


_MODE = re.compile(r"^(mixed-batch )?(branch|fold) ")


def compiled_graph(gm: fx.GraphModule, report: RewriteReport, count: int, rewrite_s: float,
                   compile_s: float) -> CompiledGraph:
    """What the record of one compiled graph says; ``report``'s module descriptions, less the mode
    they start with, are its forms."""
    forms = Counter(_MODE.sub("", what) for what in report.modules.values())
    mixed = any(what.startswith("mixed-batch ") for what in report.modules.values())
    graph = str(gm.meta.get("backend_id", ""))
    return CompiledGraph(count, str(gm.meta.get("dynamo_compile_id", "") or ""), _frame(),
                         re.sub(r"^(__compiled_fn_\d+)_.*", r"\1", graph), f"mixed-batch {report.mode}" if mixed
                         else report.mode, len(report.modules), report.sites, len(report.substituted), dict(forms),
                         rewrite_s, compile_s)


def _frame() -> str:
    from .dynamo import _code_being_compiled

    code = _code_being_compiled()
    if code is None:
        return ""
    return f"{code.co_name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"


def log_compile(gm: fx.GraphModule, report: RewriteReport, count: int, rewrite_s: float, compile_s: float) -> None:
    """Log one compiled graph: an INFO line, then the report's lines at DEBUG. Nothing is
    computed when neither level is on."""
    if not log.isEnabledFor(logging.INFO):
        return
    what = compiled_graph(gm, report, count, rewrite_s, compile_s)
    log.info("%s", what, extra={"lora_fx": what})
    if log.isEnabledFor(logging.DEBUG):
        log.debug("graph %d %s:\n%s", count, what.graph or "(unnamed)", report, extra={"lora_fx": what})


_from_env()
