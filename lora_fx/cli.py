"""The ``lora-fx`` command: inspect an adapter, merge adapters into a model, export a package, run
the benchmark.

Every error prints one line and exits with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from collections.abc import Sequence

import torch

from . import targets
from .adapter import model_problems
from .errors import LoraFxError
from .loading import load_adapter, resolve_path
from .logs import set_logs
from .quantized import module_format
from .reference import merged_state_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "generation_config.json")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _load_model(directory: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    directory = resolve_path(directory, what="transformers model", error=LoraFxError, hub=False)
    config = AutoConfig.from_pretrained(directory)
    arch = (getattr(config, "architectures", None) or [""])[0]
    loader = AutoModelForCausalLM if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel") else AutoModel
    return loader.from_pretrained(directory).eval()


def inspect(args: argparse.Namespace) -> int:
    adapter = load_adapter(args.adapter)
    cfg = adapter.config
    variant = "DoRA" if cfg.use_dora else "rsLoRA" if cfg.use_rslora else "LoRA"
    print(f"adapter {args.adapter}: {variant}, r={cfg.r}, lora_alpha={cfg.lora_alpha}, "
          f"target_modules={cfg.target_modules!r}, base model {cfg.base_model_name_or_path or '(not recorded)'}")
    rows = []
    for fqn, w in adapter.modules.items():
        kind = "embedding" if w.embedding else "linear"
        v = "DoRA" if w.magnitude is not None else "rsLoRA" if cfg.use_rslora else "LoRA"
        tensors = [t for t in (w.lora_a, w.lora_b, w.magnitude, w.bias) if t is not None]
        n = sum(t.numel() for t in tensors)
        size = sum(t.numel() * t.element_size() for t in tensors)
        rows.append((fqn, kind, str(w.rank), f"{targets.alpha_of(cfg, fqn):g}", f"{w.scale:.4g}", v, f"{n:,}",
                     _fmt_bytes(size)))
    head = ("module", "kind", "rank", "alpha", "scale", "variant", "params", "bytes")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    total = sum(int(r[6].replace(",", "")) for r in rows)
    print(f"{len(rows)} modules, {total:,} parameters; {len(adapter.overrides)} replaced tensors"
          + (f": {', '.join(sorted(adapter.overrides))}" if adapter.overrides else ""))
    if args.model:
        model = _load_model(args.model)
        matched = targets.matched_modules(cfg, model)
        print(f"\nagainst {args.model}: the config matches {len(matched)} modules")
        problems = model_problems(adapter, model)
        mods = dict(model.named_modules())
        formats: dict[str, int] = {}
        for m in mods.values():
            if isinstance(m, (*targets.linear_like_types(), torch.nn.Embedding)):
                fmt = module_format(m) or f"dense {getattr(m.weight, 'dtype', '')}".strip()
                formats[fmt] = formats.get(fmt, 0) + 1
        print("base weights: " + ", ".join(f"{fmt}: {n} modules" for fmt, n in sorted(formats.items()))
              + ("" if all(f.startswith("dense") for f in formats) else "  (quantized: branch mode only)"))
        for fqn in matched:
            fmt = module_format(mods[fqn]) if fqn in mods else None
            print(f"  matched  {fqn}" + (f"  [{fmt}]" if fmt else "")
                  + ("" if fqn in adapter.modules else "   (no tensors in the adapter)"))
        for p in problems:
            print(f"  problem  {p}")
        if problems:
            return 1
    return 0


def merge(args: argparse.Namespace) -> int:
    scales = args.scale or [1.0] * len(args.adapter)
    if len(scales) != len(args.adapter):
        raise LoraFxError(f"--scale: expected one per --adapter ({len(args.adapter)}), found {len(scales)}")
    adapters = [load_adapter(d, scale=s) for d, s in zip(args.adapter, scales)]
    model = _load_model(args.model)
    for a in adapters:
        a.check(model)
    model.load_state_dict(merged_state_dict(model, adapters))
    model.save_pretrained(args.out, safe_serialization=True)
    copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(args.model, f))]
    for f in copied:
        shutil.copy(os.path.join(args.model, f), os.path.join(args.out, f))
    print(f"merged {len(adapters)} adapter(s) into {args.out} ({len(copied)} tokenizer files copied)")
    return 0


def export_package(args: argparse.Namespace) -> int:
    from .package import export

    adapter = load_adapter(args.adapter)
    model = _load_model(args.model).eval()
    adapter.check(model)
    ids = torch.ones(1, 8, dtype=torch.long)
    seq = torch.export.Dim("seq", min=2, max=args.max_seq)
    export(model, (), adapter, kwargs={"input_ids": ids, "use_cache": False}, mode=args.mode, max_rank=args.max_rank,
           dynamic_shapes={"input_ids": {1: seq}, "use_cache": None}, path=args.out)
    print(f"wrote {args.out} ({args.mode}, sequence length 2..{args.max_seq}); lora_fx.load_package(path) runs it "
          "and swaps adapters")
    return 0


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of repetitions)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {text!r}")
    return n


def bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(([] if args.reps is None else ["--reps", str(args.reps)]) + args.bench_args)


def _one_line(text: str) -> str:
    """A multi-line message as one line: "header: problem; problem"."""
    lines = [line.strip(" -") for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else ""
    return lines[0] + (" " if lines[0].endswith(":") else "; ") + "; ".join(lines[1:])


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    """A warning as one line on stderr, without the source line ``warnings`` would print."""
    kind = "" if category is UserWarning else f"{category.__name__}: "
    print(f"lora-fx: warning: {kind}{_one_line(str(message))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lora-fx", description="LoRA adapters inside torch.compile")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no log line per compiled graph (LORA_FX_LOGS, if set, wins)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="summarise an adapter (and how it fits a model)")
    s.add_argument("adapter")
    s.add_argument("--model", help="a transformers model directory to check the adapter against")
    s.set_defaults(func=inspect)
    s = sub.add_parser("merge", help="write a model with adapters merged into its weights")
    s.add_argument("--model", required=True)
    s.add_argument("--adapter", action="append", required=True)
    s.add_argument("--scale", action="append", type=float, help="load-time scale, one per --adapter")
    s.add_argument("--out", required=True)
    s.set_defaults(func=merge)
    s = sub.add_parser("export", help="an AOTInductor package of a causal LM with a swappable adapter")
    s.add_argument("--model", required=True)
    s.add_argument("--adapter", required=True)
    s.add_argument("--out", required=True, help="the package file (.pt2)")
    s.add_argument("--mode", choices=("branch", "fold"), default="branch")
    s.add_argument("--max-rank", type=int, help="branch mode's rank budget for later swaps")
    s.add_argument("--max-seq", type=int, default=4096, help="the longest sequence the package takes")
    s.set_defaults(func=export_package)
    s = sub.add_parser("bench", help="run the benchmark (its other flags, e.g. --hidden 2048, pass through)")
    s.add_argument("--reps", type=positive_int, help="timed calls per variant (default 24; prefill takes half)")
    s.add_argument("bench_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=bench)
    args, unknown = p.parse_known_args(argv)
    if args.command == "bench":  # the benchmark's own parser checks the rest
        args.bench_args = [*unknown, *args.bench_args[args.bench_args[:1] == ["--"]:]]
    elif unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not args.quiet and "LORA_FX_LOGS" not in os.environ:
        set_logs("info")  # compiling is the slow part: one line per graph as it is compiled
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except (LoraFxError, OSError, ValueError, KeyError) as e:
        if args.debug:
            raise
        print(f"lora-fx: error: {_one_line(str(e)) or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
