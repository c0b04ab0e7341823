"""Collecting a graph's sites and what is wrong with them: the checks ``rewrite_graph`` runs
before it rewrites anything, one small function per concern.

- ``attribute``: which module an op belongs to (by the weight it reads, with the model known);
- ``_param_sites`` / ``_module_sites``: LoRA on bare parameters, and modules with no linear op
  (a quantized kernel's boundary);
- ``_split_modules`` / ``_owned_weights``: weights read without their module's op (a graph break
  inside the module), and every weight a graph reads for a targeted module's class (bound per
  call, see :mod:`lora_fx.binding`);
- ``_traced_without_gradient``, ``_conv_site_problems``: training through a kernel with no
  backward, and what PEFT's conv LoRA cannot express.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from . import graph as g
from .inputs import GraphInputs
from .quantized import module_format, quant_format
from .state import LoraState
from .tensors import address


def owners_of(model: torch.nn.Module, params: Iterable[str] = ()) -> dict[tuple, list[str]]:
    """(weight storage address, shape) -> the fqns of the modules whose ``weight`` it is (tied
    weights have several), for attributing a graph's op to its module by the tensor it reads.
    ``params``: more parameter names to index the same way (LoRA on bare parameters)."""
    out: dict[tuple, list[str]] = {}
    names = dict.fromkeys(("weight", *params))
    for fqn, mod in g.named(model.named_modules(remove_duplicate=False)).items():
        for name in names:
            w = getattr(mod, name, None)
            if isinstance(w, torch.Tensor):
                out.setdefault((address(w), tuple(w.shape)), []).append(fqn)
    return out


def param_names(specs: dict) -> set[str]:
    """The names of the bare parameters LoRA is merged into (``ModuleSpec.param``)."""
    return {spec.param for spec in specs.values() if spec.param is not None}


def attribute(path: str, weight: torch.Tensor | None, wanted: Iterable[str],
              owners: dict[tuple, list[str]] | None) -> str:
    """The adapter fqn of an op whose module metadata says ``path`` (relative to the traced frame).

    With the model known (``owners``), the module is the one whose weight the op reads (the path
    picks among tied weights). Without it, the path itself, or the one wanted fqn it is a suffix of
    (a graph traced from a submodule after a graph break).
    """
    def fits(fqn: str) -> bool:
        return fqn == path or not path or fqn.endswith("." + path)

    if owners is not None and weight is not None:
        cands = owners.get((address(weight), tuple(weight.shape)), [])
        best = [f for f in cands if fits(f)] or cands
        exact = [f for f in best if f == path]
        if exact or len(best) == 1:
            return (exact or best)[0]
    if path in wanted or not path:
        return path
    ends = [f for f in wanted if f.endswith("." + path)]
    return ends[0] if len(ends) == 1 else path


def _traced_without_gradient(gm: fx.GraphModule, sites: list[g.Site]) -> list[str]:
    """Module sites (a quantized kernel) whose input depends on a LoRA branch, so it needs a
    gradient in training, but was traced by dynamo as needing none (the model is frozen): the
    module's forward then took a kernel path with no backward (bitsandbytes does), and gradients
    of the A / B before it would be wrong. Returns their fqns."""
    lora = {n for n in gm.graph.nodes if n.meta.get(g.MARK)}
    after: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node in lora or any(a in after for a in node.all_input_nodes):
            after.add(node)
    out = []
    for s in sites:
        meta = g.tensor_meta(s.x)
        if s.kind == "module" and s.scope.parent is None and s.x in after and meta is not None \
                and not meta.requires_grad:
            out.append(s.fqn)
    return out


def _param_sites(top: g.Scope, specs: dict, inputs: GraphInputs, params: dict[str, torch.Tensor]) -> list[g.Site]:
    """Sites for LoRA merged into a parameter (``ModuleSpec.param``): the graph's input for it,
    wherever it is read. A graph without it (a graph break) holds none."""
    out = []
    for fqn, spec in specs.items():
        if spec.param is None:
            continue
        path = fqn if spec.experts else f"{fqn}.{spec.param}"  # an expert parameter is keyed by its own name
        node = inputs.node_for_tensor(params[path]) if path in params else inputs.node_for_path(path)
        if node is not None and node.users:
            out.append(g.Site(node, fqn, "param", top, path))
    return out


def _module_sites(scopes: list[g.Scope], found: set[str], specs: dict, inputs: GraphInputs,
                  owners: dict[tuple, list[str]] | None, problems: list[str], modules: dict[str, torch.nn.Module]
                  ) -> tuple[list[g.Site], list[g.Site]]:
    """Sites for the targeted linear modules the graph has no linear / Conv1D op of: their module
    boundary (a quantized weight's kernel, see ``graph.find_module_site``). Problems are appended.
    Also returns the boundaries of the untargeted modules of those modules' classes: dynamo may
    run this graph for a targeted one (see :func:`_owned_weights`)."""
    lacking = {fqn for fqn, spec in specs.items() if fqn not in found and not spec.embedding and spec.param is None}
    out: list[g.Site] = []
    others: list[g.Site] = []
    if not lacking:
        return out, others
    kinds = {type(modules[f]) for f in lacking if f in modules}
    for path, groups in g.module_groups(scopes).items():
        for scope, group in groups:
            if any(g.site_kind(n) is not None for n in group):
                continue  # a module with its own linear op: a plain site, attributed by its weight
            weight = g.module_weight(scope, path, group, inputs.paths)
            value = inputs.value(scope.top(weight))
            fqn = attribute(path, value, lacking, owners)
            if fqn not in lacking:
                mod = modules.get(fqn)
                if type(mod) in kinds and hasattr(mod, "out_features"):
                    site = g.find_module_site(scope, path, group, (mod.out_features, mod.in_features), inputs.paths,
                                              weight)
                    if isinstance(site, g.Site):
                        site.fqn = fqn
                        others.append(site)
                continue
            site = g.find_module_site(scope, path, group, specs[fqn].shape, inputs.paths, weight)
            if isinstance(site, str):
                problems.append(f"{fqn}: {site}")
            else:
                site.fqn = fqn
                out.append(site)
    return out, others


def _split_modules(gm: fx.GraphModule, inputs: GraphInputs, owners: dict[tuple, list[str]], specs: dict,
                   found: set[str], sites: list[g.Site], modules: dict[str, torch.nn.Module]
                   ) -> tuple[list[str], list[fx.Node]]:
    """Modules whose weight this graph reads without holding the module's op: dynamo broke the
    graph inside the module's forward (an op it cannot trace), so the op that computes the
    module's output runs between graphs, where no update can be added. Returns the problems
    (targeted modules: without this check they would silently run without their adapter) and
    the inputs that are other modules' weights: dynamo reuses such a graph for every module
    whose forward has the same code, so each call checks whose weight it gets
    (:func:`split_module_problem`)."""
    read_by_op = {s.scope.top(s.weight) for s in sites if s.weight is not None}  # e.g. a tied lm_head
    kinds = {type(modules[f]) for f in specs if f in modules}  # classes whose forward a targeted module runs
    out, foreign, named = [], [], set()
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr") or node in read_by_op or not node.users:
            continue
        value = inputs.value(node)
        if not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor):
            continue
        fqns = owners.get((address(value), tuple(value.shape)), [])
        if not fqns or any(f in found for f in fqns):
            continue
        readers = {g.module_fqn(u) or "" for u in node.users}  # module paths (relative to the frame) reading it
        rooted = inputs.paths.get(node) == "weight" and "" in readers  # the frame is the module's own forward
        # another module reading this weight (a tied head's matmul) is not this module's forward split apart
        fqns = [f for f in fqns if rooted or any(m and (f == m or f.endswith("." + m)) for m in readers)]
        targeted = [f for f in fqns if f in specs]
        out += [split_module_problem(f, node.name, modules.get(f)) for f in targeted if f not in named]
        named.update(targeted)
        if not targeted and any(type(modules.get(f)) in kinds for f in fqns):
            foreign.append((node, set(fqns)))
    return out, foreign


def _owned_weights(inputs: GraphInputs, sites: list[g.Site], foreign: list[tuple[fx.Node, set[str]]], specs: dict,
                   modules: dict[str, torch.nn.Module], owners: dict[tuple, list[str]]
                   ) -> list[tuple[int, set[str], bool]]:
    """(call position, the modules it was compiled for, whether the graph lacks their op) of every
    weight input the graph reads for a module of a targeted module's class. Dynamo reuses a
    compiled graph for every module whose forward has the same code when its guards cannot tell
    them apart (regional compilation with ``layer.compile``, a graph break between or inside
    modules): the graph then holds the adapter tensors of the modules it was compiled for, so
    each call checks whose weights it gets (``binding.Binder``)."""
    kinds = {type(modules[f]) for f in specs if f in modules}
    out: dict[int, tuple[set[str], bool]] = {}
    for s in sites:
        if s.weight is None or type(modules.get(s.fqn)) not in kinds:
            continue
        pos = inputs.ref(s.scope.top(s.weight))
        if isinstance(pos, int):
            out.setdefault(pos, (set(), False))[0].add(s.fqn)
    held = set(out)
    for node, fqns in foreign:  # weights a graph reads without the module's op (see _split_modules)
        pos = inputs.ref(node)
        if isinstance(pos, int):
            out[pos] = (out.get(pos, (set(), True))[0] | fqns, True)
    # LoRA on bare parameters, merged wherever the parameter is read (no op to split): the same
    # parameter of the untargeted modules of a targeted one's class
    by_kind = {(type(modules[f]), specs[f].param) for f in specs if f in modules and specs[f].param is not None}
    for node, value in inputs.values.items():
        pos = inputs.ref(node)
        if not isinstance(pos, int) or pos in held or not node.users:
            continue
        fqns = {f for f in owners.get((address(value), tuple(value.shape)), [])
                if any(type(modules.get(f)) is k and getattr(modules[f], name, None) is value for k, name in by_kind)}
        if fqns:
            out[pos] = (fqns, False)
    return [(pos, fqns, split) for pos, (fqns, split) in sorted(out.items())]


def split_module_problem(fqn: str, what: str, module: torch.nn.Module | None) -> str:
    fmt = module_format(module) if module is not None else None
    hint = ("; bitsandbytes Linear8bitLt breaks the graph at its outlier split (an op whose output shape depends on "
            "the data): set torch._dynamo.config.capture_dynamic_output_shape_ops = True before compiling, so its "
            "forward compiles whole" if fmt and "bitsandbytes int8" in fmt else "")
    return (f"{fqn}: expected its op in the graph that reads its weight ({what}), found none: a graph break inside the "
            f"module's forward leaves the op computing its output outside every graph, where no update can be added"
            f"{hint}")


def _conv_site_problems(s: g.Site, spec: Any, state: LoraState, modules: dict[str, torch.nn.Module]) -> list[str]:
    """What a conv site cannot do: PEFT's lora_A is not dilated and pads with zeros; a grouped
    conv's update is not a grouped kernel (no fold, as PEFT cannot merge it); no mixed batches."""
    p = []
    args = s.conv_args()
    dilation = args["dilation"]
    if any(d != 1 for d in (dilation if isinstance(dilation, (list, tuple)) else [dilation])) and \
            any(k != 1 for k in spec.kernel):
        p.append(f"{s.fqn}: dilation={dilation}: PEFT's lora_A is not dilated, so its output does not match the "
                 "base's shape; expected dilation 1")
    mod = modules.get(s.fqn)
    x = s.x
    padded_inside = isinstance(x, fx.Node) and x.op == "call_function" and "pad" in str(x.target) \
        and g.module_fqn(x) == s.path  # the conv module itself padded its input: padding_mode != zeros
    if padded_inside and (mod is None or getattr(mod, "padding_mode", "zeros") == "zeros"):
        p.append(f"{s.fqn}: its input is padded inside the module ({x.target}), as padding_mode='reflect' / "
                 "'replicate' / 'circular' do: PEFT's lora_A pads with zeros; expected padding_mode='zeros'")
    if mod is not None and getattr(mod, "padding_mode", "zeros") != "zeros":
        p.append(f"{s.fqn}: padding_mode={mod.padding_mode!r}: PEFT's lora_A pads with zeros, the base does not; "
                 "expected padding_mode='zeros'")
    if spec.groups > 1 and state.inplace:
        p.append(f"{s.fqn}: groups={spec.groups}: B A mixes the groups, so W' is a dense kernel that does not fit "
                 "the module's grouped weight; use inplace=False (the op then runs dense) or mode='branch'")
    if state.mixed:
        p.append(f"{s.fqn}: mixed-adapter batches over a convolution are not supported; serve one adapter per "
                 "batch (swap) or leave this module out of the adapters")
    return p


def fold_trained_bases(sites: list[g.Site], inputs: GraphInputs,
                       state: LoraState) -> tuple[dict[int, tuple[str, ...]], list[tuple[str, Any]]]:
    """Fold mode, a graph traced with gradients on: per site, the base tensors (roles "weight",
    "bias") that require grad and get W''s gradient (``passes.fold``: dW'/dW = 1); and for those
    that would not get PEFT's gradient that way, the problem with where a call finds the tensor
    (a backward through the graph is then refused: see ``call.bind``)."""
    trained: dict[int, tuple[str, ...]] = {}
    untrained: list[tuple[str, Any]] = []
    for s in sites:
        spec = state.layout.specs[s.fqn]
        nodes = {role: s.scope.top(n) for role, n in (("weight", s.weight), ("bias", s.bias)) if n is not None}
        roles = tuple(r for r, n in nodes.items() if getattr(inputs.value(n), "requires_grad", False))
        why = _fold_gradient_problem(spec, state.inplace, quant_format(inputs.value(nodes["weight"])), roles)
        if why is None:
            trained[id(s)] = roles
            continue
        untrained += [(f"{s.fqn}.{role}: {why}", inputs.ref(nodes[role])) for role in roles]
    return trained, untrained


def _fold_gradient_problem(spec: Any, inplace: bool, fmt: str | None, roles: tuple[str, ...]) -> str | None:
    """Why W' + (W - W.detach()) would not give a module's trained base PEFT's gradient, if it would not."""
    if not roles:
        return None
    if inplace:
        return ("fold in place merges B A into the model's own tensor, so training it would train the merged "
                "weight; use inplace=False")
    if "weight" not in roles:
        return None
    if spec.groups > 1:
        return "a grouped conv folds into a dense kernel, not the grouped one PEFT trains; use mode='branch'"
    if fmt is not None:
        return f"its weight is {fmt}, folded and quantized again, which has no gradient; use mode='branch'"
    return None
