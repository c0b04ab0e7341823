"""rewrite(): apply adapters to a GraphModule or ExportedProgram; the driver the backend shares.

One walk over the graph and its higher-order-op bodies collects the sites (linear / Conv1D /
embedding ops with their module), checks them against the layout the state was built for, then
runs the passes: substitute (modules_to_save, biases), then branch, mixed or fold.

At 340 lines it is over the house limit: ``rewrite_graph`` is still one driver (attribute, collect,
check, substitute, dispatch the pass, lint), its checks already in :mod:`lora_fx.collect`; turning
its body into the pure steps of an Inductor pass is the next split.
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
from .collect import (
    _conv_site_problems,
    _module_sites,
    _owned_weights,
    _param_sites,
    _split_modules,
    _traced_without_gradient,
    attribute,
    fold_trained_bases,
    owners_of,
    param_names,
)
from .errors import GraphRewriteError, raise_if
from .experts import implementation, module_of
from .inplace import merged_by_other, merged_problem
from .inputs import HOLDER, ExportInputs, GraphInputs, ModuleInputs
from .passes import (
    fold_lora_weights,
    insert_expert_branches,
    insert_lora_branches,
    insert_mixed_lora_branch,
    substitute_tensors,
)
from .passes.experts import expert_branch_problems
from .passes.mixed import batched_input
from .quantized import quant_format
from .state import Derived, LoraState

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


class Feeder:
    """Adds tensors to a graph and threads them into the higher-order-op bodies that read them."""

    def __init__(self, inputs: GraphInputs):
        self.inputs = inputs
        self._cache: dict[tuple[int, int], fx.Node] = {}

    def node(self, scope: g.Scope | None, name: str, tensor: torch.Tensor) -> fx.Node:
        if scope is None or scope.parent is None:
            return self.inputs.add(name, tensor)
        key = (id(scope.gm), id(tensor))
        if key not in self._cache:
            self._cache[key] = scope.pass_in(self.node(scope.parent, name, tensor))
        return self._cache[key]


@dataclass
class Rewritten:
    """What one rewrite did: the report, and for each derived tensor set the graph reads, where its
    base tensors come from in a call (an int: that position of the call's arguments)."""

    report: RewriteReport
    derived: list[tuple[Derived, tuple]]
    batch: Any = None  # mixed batches: where the call's batch size is read (see passes.mixed)
    no_backward: list[str] = field(default_factory=list)  # see _traced_without_gradient
    owned: list[tuple[int, set[str], bool]] = field(default_factory=list)  # see _owned_weights
    added: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> role -> tensor added
    untrained: list[tuple[str, Any]] = field(default_factory=list)  # see collect.fold_trained_bases


def rewrite_graph(gm: fx.GraphModule, inputs: GraphInputs, state: LoraState, fuse_tokens: int = 0, *,
                  model: torch.nn.Module | None = None, require_all: bool = True) -> Rewritten:
    """Apply ``state``'s layout to ``gm`` (and the bodies of its higher-order ops) in place.

    Every module the layout holds is rewritten where the graph has its op, whatever adapter is
    active now. ``require_all``: every module must be in this graph (whole-model graphs); else a
    graph holds the modules it holds (graph breaks). ``model``: the model the adapter names, for
    attributing ops by the weight they read.

    Raises GraphRewriteError listing every problem."""
    if any(n.meta.get(g.MARK) for n in gm.graph.nodes):
        raise GraphRewriteError("graph: expected a graph without LoRA, found one lora_fx already rewrote")
    specs = state.layout.specs
    owners = owners_of(model, param_names(specs)) if model is not None else None
    found_ops = g.find_sites(gm, inputs.paths)
    sites, unattributed = found_ops.sites, found_ops.unattributed

    def weight_of(node: fx.Node | None, scope: g.Scope | None) -> torch.Tensor | None:
        return inputs.value(scope.top(node)) if scope is not None else None

    for s in sites:
        s.fqn = attribute(s.path, weight_of(s.weight, s.scope), specs, owners)
    chosen = [s for s in sites if s.fqn in specs and specs[s.fqn].param is None]
    problems: list[str] = []
    params = {} if model is None else g.named([*model.named_parameters(remove_duplicate=False),
                                               *model.named_buffers(remove_duplicate=False)])
    chosen += _param_sites(found_ops.scopes[0], specs, inputs, params)
    modules = {} if model is None else g.named(model.named_modules(remove_duplicate=False))
    boundaries, others = _module_sites(found_ops.scopes, {s.fqn for s in chosen}, specs, inputs, owners, problems,
                                       modules)
    chosen += boundaries
    found = {s.fqn for s in chosen}
    for r in found_ops.refused:
        fqn = attribute(r.path or "", None, specs, owners) if r.path is not None else None
        if fqn in specs and fqn not in found:
            problems.append(f"{fqn}: its op is {r.why}; expected it in the graph or an activation-checkpoint body")
    missing = [fqn for fqn in specs if fqn not in found] if require_all else []
    if missing:
        hint = (f"; {len(unattributed)} linear-like ops have no module metadata (nn_module_stack)"
                if unattributed else f"; modules seen in the graph: {sorted({s.fqn for s in sites})[:8]}")
        problems += [f"{fqn}: expected a linear / Conv1D / embedding op of this module in the graph, found none{hint}"
                     for fqn in missing]
    foreign: list[tuple[fx.Node, set[str]]] = []
    held = sites + boundaries + others  # every op the graph holds for a module
    if owners is not None:
        split, foreign = _split_modules(gm, inputs, owners, specs, found | {s.fqn for s in held}, held, modules)
        problems += split
    # before rewriting
    owned = _owned_weights(inputs, held + [s for s in chosen if s.kind == "param"], foreign, specs, modules,
                           owners) if owners is not None else []
    formats: dict[str, str | None] = {}  # module fqn -> its weight's quantized format, if any
    for s in chosen:
        spec = specs[s.fqn]
        if spec.embedding != (s.kind == "embedding"):
            problems.append(f"{s.fqn}: adapter holds {'embedding' if spec.embedding else 'linear'} LoRA, "
                            f"the graph's op is {s.kind}")
        w = weight_of(s.weight, s.scope)
        if w is None:
            problems.append(f"{s.fqn}: expected its weight to be a parameter of the graph, found {s.weight}")
            continue
        for what, t in (("weight", w), ("bias", weight_of(s.bias, s.scope))):
            if (holder := merged_by_other(t, state)) is not None:
                problems.append(merged_problem(s.fqn, what, holder))
        fmt = formats[s.fqn] = quant_format(w) or (f"computed by {s.node.target}" if s.kind == "module" else None)
        requantizable = s.kind == "linear" and (fmt or "").startswith("torchao") and hasattr(w, "dequantize")
        if fmt is not None and state.mode == "fold" and not (requantizable and state.requantize is not None):
            hint = ("; or, to fold with the format's rounding, pass requantize=<the torchao config the model was "
                    "quantized with> (mode='fold', not in place)" if requantizable and not state.inplace else "")
            problems.append(f"{s.fqn}: fold mode merges B A into the weight, which is {fmt}; use mode='branch' "
                            f"(the update is added at the module's output and the weight stays as it is){hint}")
        if fmt is not None and spec.dora:
            problems.append(f"{s.fqn}: DoRA needs the dense weight's row norms, the weight is {fmt}; use plain LoRA")
        shared = [name for name, p in params.items() if p is w] if state.inplace else []
        if len(shared) > 1:  # tied weights: merging into the tensor would change every op that reads it
            problems.append(f"{s.fqn}: fold in place would merge B A into its weight, which is also {sorted(shared)} "
                            "(tied weights), so the other modules would compute with the update too; use "
                            "inplace=False (W' is then a separate tensor) or mode='branch'")
        if s.kind == "module":
            continue  # its input and output widths were checked where it was found
        if s.kind == "param" and spec.experts and state.mode == "branch":
            impl = implementation(modules.get(module_of(s.fqn, spec)))
            problems += expert_branch_problems(s, impl, spec.dtype, state.layout.rank)
        if s.kind == "param" and state.mixed:
            problems.append(f"{s.fqn}.{spec.param}: mixed-adapter batches cannot merge several adapters into one "
                            "parameter; serve one adapter per batch (swap)")
        if s.kind == "conv":
            problems += _conv_site_problems(s, spec, state, modules)
        if s.kind == "embedding" and (max_norm := s.embedding_args()["max_norm"]) is not None:
            problems.append(f"{s.fqn}: embedding with max_norm={max_norm}: PEFT renormalizes "
                            "the rows it looks up in place, in the base weight and in LoRA's A separately, at every "
                            "call, which no folded or added update reproduces; expected max_norm=None")
        out_f, in_f = spec.shape
        experts = (spec.experts,) if spec.experts else ()  # a 3-D expert parameter (E, out, in)
        shape = {"linear": (out_f, in_f), "param": (*experts, out_f, in_f), "conv1d": (in_f, out_f),
                 "embedding": (in_f, out_f), "conv": (out_f, in_f // spec.groups, *spec.kernel)}[s.kind]
        if tuple(w.shape) != shape:
            problems.append(f"{s.fqn}: expected weight shape {shape} for the adapter's A/B, found {tuple(w.shape)}")
    replacements: dict[fx.Node, fx.Node] = {}
    substituted: list[str] = []
    feeder, derived = Feeder(inputs), []
    for path in sorted(state.layout.overrides):
        node = inputs.node_for_tensor(params[path]) if path in params else inputs.node_for_path(path)
        if node is None:
            if require_all:
                problems.append(f"{path}: the adapter replaces this tensor, the graph has no such parameter")
            continue
        # a modules_to_save copy is the module's alone (a saved base tensor PEFT loads into the shared one)
        tied = sorted(name for name, p in params.items() if p is params[path]) \
            if path in params and path in state.layout.copies else []
        if len(tied) > 1:  # one tensor, one graph input: substituting it would reach every op that reads it
            problems.append(f"{path}: the adapter replaces this tensor (modules_to_save), which is also "
                            f"{[n for n in tied if n != path]} (tied weights); every op reading it would see the "
                            "replacement, where PEFT gives it to this module alone. Untie them before compiling "
                            f"(model.{path} = torch.nn.Parameter(model.{path}.clone()))")
            continue
        value = inputs.value(node)
        want = tuple(state.adapters.overrides[path].shape) if path in state.adapters.overrides else tuple(value.shape)
        if tuple(value.shape) != want:
            problems.append(f"{path}: expected shape {tuple(value.shape)}, found {want}")
            continue
        t, d = state.override_tensor(path, value)
        replacements[node] = feeder.node(None, f"{path}.lora_fx", t)
        substituted.append(path)
        derived.append((d, (inputs.ref(node),)))
    raise_if(problems, GraphRewriteError, "cannot apply the adapter to this graph:")
    report = RewriteReport(state.mode)
    report.substituted = substituted
    substitute_tensors(gm.graph, replacements)

    ranks: dict[int, int] = {}  # A's rows, by site
    added: dict[str, dict[str, torch.Tensor]] = {}

    def nodes(s: g.Site) -> dict[str, fx.Node]:
        w_top, b_top = s.scope.top(s.weight), s.scope.top(s.bias) if s.bias is not None else None
        tensors, d = state.module_tensors(s.fqn, s.kind, inputs.value(w_top), inputs.value(b_top))
        if not torch.is_grad_enabled():  # an inference graph: no lora_dropout (see dropout)
            tensors = {role: t for role, t in tensors.items() if role != "dropout"}
        if "row_scale" in tensors and "weight" not in trained.get(id(s), ()):  # read only where W trains
            tensors = {role: t for role, t in tensors.items() if role != "row_scale"}
        added.setdefault(s.fqn, {}).update(tensors)
        derived.append((d, (inputs.ref(w_top), inputs.ref(b_top))))
        ranks[id(s)] = tensors["lora_a"].shape[0] if "lora_a" in tensors else 0
        return {role: feeder.node(s.scope, f"{s.fqn}.{role}", t) for role, t in tensors.items()}

    before = len(inputs.values)
    batch = None
    trained: dict[int, tuple[str, ...]] = {}
    untrained: list[tuple[str, Any]] = []
    if state.mode == "fold":
        trained, untrained = fold_trained_bases(chosen, inputs, state) if torch.is_grad_enabled() else ({}, [])
        report.sites = fold_lora_weights(chosen, nodes, lambda s: trained.get(id(s), ()))
    elif state.mixed:
        for s in chosen:
            t = nodes(s)
            index = feeder.node(s.scope, "lora_fx.index", state.selection.index)
            rows = feeder.node(s.scope, "lora_fx.rows", state.selection.rows)
            vocab = inputs.value(s.scope.top(s.weight)).shape[0] if s.kind == "embedding" else 0
            insert_mixed_lora_branch(s, t, index, rows, specs[s.fqn].dtype, vocab)
            batch = batch if batch is not None else inputs.batch_ref(g.tensor_meta(batched_input(s)[0]).shape[0])
        report.sites = len(chosen)
    else:
        pointwise = {s.fqn for s in chosen if s.kind == "linear" and formats.get(s.fqn)}  # torchao weights
        experts = [s for s in chosen if s.kind == "param" and specs[s.fqn].experts]  # 3-D expert parameters
        report.sites = insert_lora_branches([s for s in chosen if all(s is not e for e in experts)],
                                            lambda s: (nodes(s), specs[s.fqn].dtype, ranks[id(s)]), fuse_tokens,
                                            pointwise)
        report.sites += insert_expert_branches(experts, lambda s: (nodes(s), specs[s.fqn].dtype), state.layout.rank)
    report.added_inputs = len(inputs.values) - before + len(replacements)
    no_backward = [] if state.mode == "fold" else _traced_without_gradient(gm, chosen)
    for s in chosen:
        fmt = formats.get(s.fqn)
        report.modules.setdefault(s.fqn, state.describe(s.fqn, s.kind) + (f" over {fmt}" if fmt else ""))
    touched = {id(gm): gm}
    for s in chosen:
        scope = s.scope
        while scope is not None:
            touched[id(scope.gm)] = scope.gm
            scope = scope.parent
    for graph_module in touched.values():
        graph_module.graph.lint()
        graph_module.recompile()
    return Rewritten(report, derived, batch, no_backward, owned, added, untrained)


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
    return rewrite_graph(gm, ModuleInputs(gm), state, cfg.fuse_tokens).report


def _rewrite_exported(ep: Any, state: LoraState, fuse_tokens: int) -> Any:
    from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

    gm = copy.deepcopy(ep.graph_module)
    inputs = ExportInputs(ep, gm)
    report = rewrite_graph(gm, inputs, state, fuse_tokens).report
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

