"""rewrite(): apply adapters to a GraphModule or ExportedProgram; the driver the backend shares.

One pass over the graph collects the sites (linear / Conv1D / embedding ops with their module),
checks every adapter module is found exactly where expected, then runs the passes: substitute
(modules_to_save, biases), then branch or fold.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from . import graph as g
from .adapter import Adapter, as_adapters
from .errors import GraphRewriteError, raise_if
from .inputs import HOLDER, ExportInputs, GraphInputs, ModuleInputs
from .passes import fold_lora_weights, insert_lora_branches, insert_mixed_lora_branch, substitute_tensors
from .state import LoraState

MODES = ("branch", "fold")


@dataclass
class RewriteConfig:
    """What ``rewrite`` applies.

    Args:
        adapters: one Adapter, or a list whose updates are summed.
        mode: "branch" (keep W, add the low-rank update) or "fold" (use W' = W + scale * B A).
        max_rank: branch mode's rank budget (padding); default the adapters' largest rank.
        fuse_tokens: branch mode: an op whose token count is static and at most this gets its
            update as elementwise products and sums (fused by Inductor into the kernels around
            it) instead of two GEMM calls; 0 (default) always uses the GEMMs.
    """

    adapters: Adapter | Sequence[Adapter]
    mode: str = "branch"
    max_rank: int | None = None
    fuse_tokens: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, found {self.mode!r}")
        self.adapters = as_adapters(self.adapters)


@dataclass
class RewriteReport:
    """What a rewrite did: module fqn -> description, the replaced parameters, counters."""

    mode: str
    modules: dict[str, str] = field(default_factory=dict)
    substituted: list[str] = field(default_factory=list)
    sites: int = 0
    added_inputs: int = 0

    def __str__(self) -> str:
        lines = [f"lora_fx {self.mode}: {self.sites} ops in {len(self.modules)} modules, "
                 f"{len(self.substituted)} tensors substituted, {self.added_inputs} tensors added"]
        lines += [f"  {fqn}: {what}" for fqn, what in self.modules.items()]
        lines += [f"  {path}: substituted" for path in self.substituted]
        return "\n".join(lines)


def _describe(state: LoraState, fqn: str, kind: str) -> str:
    ws = state.modules[fqn]
    rslora = any(a.config.use_rslora for slot in state.slots for a in slot if fqn in a.modules)
    variant = "DoRA" if ws[0].magnitude is not None else "rsLoRA" if rslora else "LoRA"
    ranks = "+".join(str(w.rank) for w in ws)
    mode = "mixed-batch branch" if state.mixed else state.mode
    return f"{mode} {kind} r={ranks} {variant}" + (" +bias" if any(w.bias is not None for w in ws) else "")


def rewrite_graph(gm: fx.GraphModule, inputs: GraphInputs, state: LoraState, fuse_tokens: int = 0) -> RewriteReport:
    """Apply ``state``'s adapters to ``gm`` in place (``fuse_tokens``: see RewriteConfig).

    Raises GraphRewriteError listing every problem."""
    graph = gm.graph
    if any(n.meta.get(g.MARK) for n in graph.nodes):
        raise GraphRewriteError("graph: expected a graph without LoRA, found one lora_fx already rewrote")
    sites, unattributed = g.find_sites(graph, inputs.paths)
    wanted = state.modules
    chosen = [s for s in sites if s.fqn in wanted]
    problems: list[str] = []
    found = {s.fqn for s in chosen}
    missing = [fqn for fqn in wanted if fqn not in found]
    if missing:
        hint = (f"; {len(unattributed)} linear-like ops have no module metadata (nn_module_stack)"
                if unattributed else f"; modules seen in the graph: {sorted({s.fqn for s in sites})[:8]}")
        problems += [f"{fqn}: expected a linear / Conv1D / embedding op of this module in the graph, found none{hint}"
                     for fqn in missing]
    for s in chosen:
        emb = wanted[s.fqn][0].embedding
        if emb != (s.kind == "embedding"):
            held = "embedding" if emb else "linear"
            problems.append(f"{s.fqn}: adapter holds {held} LoRA, the graph's op is {s.kind}")
        w = inputs.value(s.weight)
        if w is None:
            problems.append(f"{s.fqn}: expected its weight to be a parameter of the graph, found {s.weight}")
            continue
        out_f, in_f = wanted[s.fqn][0].lora_b.shape[0], wanted[s.fqn][0].lora_a.shape[1]
        shape = {"linear": (out_f, in_f), "conv1d": (in_f, out_f), "embedding": (in_f, out_f)}[s.kind]
        if tuple(w.shape) != shape:
            problems.append(f"{s.fqn}: expected weight shape {shape} for the adapter's A/B, found {tuple(w.shape)}")
    replacements: dict[fx.Node, fx.Node] = {}
    for path in state.overrides:
        node = inputs.node_for_path(path)
        if node is None:
            problems.append(f"{path}: the adapter replaces this tensor, the graph has no such parameter")
        elif tuple(inputs.value(node).shape) != tuple(state.overrides[path].shape):
            problems.append(f"{path}: expected shape {tuple(inputs.value(node).shape)}, "
                            f"found {tuple(state.overrides[path].shape)}")
        else:
            replacements[node] = inputs.add(f"{path}.lora_fx", state.override(path, inputs.value(node)))
    raise_if(problems, GraphRewriteError, "cannot apply the adapter to this graph:")
    report = RewriteReport(state.mode)
    report.substituted = sorted(state.overrides)
    substitute_tensors(graph, replacements)

    def site_tensors(s: g.Site) -> dict[str, torch.Tensor]:
        w_node, b_node = s.weight, s.bias
        return state.module_tensors(s.fqn, s.kind, inputs.value(w_node), inputs.value(b_node))

    def nodes(s: g.Site) -> dict[str, fx.Node]:
        return {role: inputs.add(f"{s.fqn}.{role}", t) for role, t in site_tensors(s).items()}

    before = len(inputs.values)
    if state.mode == "fold":
        report.sites = fold_lora_weights(graph, chosen, nodes)
    elif state.mixed:
        if chosen:
            state.place_selection(inputs.value(chosen[0].weight).device)
        index, rows = inputs.add("lora_fx.index", state.index), inputs.add("lora_fx.rows", state.rows)
        for s in chosen:
            vocab = inputs.value(s.weight).shape[0] if s.kind == "embedding" else 0
            insert_mixed_lora_branch(graph, s, nodes(s), index, rows, state.modules[s.fqn][0].lora_a.dtype, vocab)
        report.sites = len(chosen)
    else:
        report.sites = insert_lora_branches(graph, chosen, lambda s: (nodes(s), state.modules[s.fqn][0].lora_a.dtype),
                                            fuse_tokens)
    report.added_inputs = len(inputs.values) - before + len(replacements)
    for s in chosen:
        report.modules.setdefault(s.fqn, _describe(state, s.fqn, s.kind))
    graph.lint()
    gm.recompile()
    return report


def rewrite(gm: fx.GraphModule | Any, cfg: RewriteConfig) -> RewriteReport | Any:
    """Apply ``cfg``'s adapters to a graph.

    Args:
        gm: a GraphModule from ``torch.fx.symbolic_trace``, ``torch.export`` (``ep.module()``) or
            dynamo (rewritten in place), or an ``ExportedProgram`` (left as is).
        cfg: adapters and mode. Module fqns are relative to the traced root, as PEFT's keys are.

    Returns:
        For a GraphModule, the RewriteReport (the new tensors live on ``gm.lora_fx``). For an
        ExportedProgram, a new ExportedProgram whose signature carries the new tensors as
        parameters (branch A/B) or buffers; its report is ``ep.lora_fx_report``.

    Raises:
        GraphRewriteError: an adapter module with no op in the graph, an op without module
            metadata, a graph rewritten twice, adapter shapes that do not fit the graph's weights.
    """
    state = LoraState(cfg.adapters, cfg.mode, cfg.max_rank)
    if isinstance(gm, torch.export.ExportedProgram):
        return _rewrite_exported(gm, state, cfg.fuse_tokens)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"rewrite: expected a GraphModule or ExportedProgram, found {type(gm).__name__}")
    if hasattr(gm, HOLDER):
        raise GraphRewriteError("graph: expected a graph without LoRA, found one lora_fx already rewrote")
    g.inline_leaf_modules(gm)
    return rewrite_graph(gm, ModuleInputs(gm), state, cfg.fuse_tokens)


def _rewrite_exported(ep: Any, state: LoraState, fuse_tokens: int) -> Any:
    from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

    gm = copy.deepcopy(ep.graph_module)
    inputs = ExportInputs(ep, gm)
    report = rewrite_graph(gm, inputs, state, fuse_tokens)
    state_dict = dict(ep.state_dict)
    new_by_node = {node: (target, t) for node, target, t in inputs.new_specs}
    specs = []
    by_name = {s.arg.name: s for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
    for node in gm.graph.find_nodes(op="placeholder"):
        if node in new_by_node:
            target, t = new_by_node[node]
            kind = InputKind.PARAMETER if isinstance(t, torch.nn.Parameter) else InputKind.BUFFER
            specs.append(InputSpec(kind, TensorArgument(node.name), target, True if kind is InputKind.BUFFER else None))
            state_dict[target] = t
        else:
            specs.append(by_name[node.name])
    outputs = gm.graph.output_node().args[0]
    out_specs = [dataclasses.replace(spec, arg=TensorArgument(outputs[i].name))
                 if isinstance(spec.arg, TensorArgument) else spec
                 for i, spec in enumerate(ep.graph_signature.output_specs)]
    sig = copy.copy(ep.graph_signature)
    sig.input_specs, sig.output_specs = specs, out_specs
    new = torch.export.ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=sig, state_dict=state_dict,
        range_constraints=ep.range_constraints, module_call_graph=ep.module_call_graph,
        example_inputs=ep.example_inputs, constants=ep.constants, verifiers=[ep.verifier],
    )
    new.lora_fx_report = report
    return new

