"""Expert branch pass: LoRA on a 3-D expert parameter W (E, out, in), added only to the rows routed
to each expert, inside the experts' computation as the graph holds it.

For the rows x_s (routed to expert e_s) the base computes y_s = x_s W[e_s]^T; the branch adds

    y_s' = y_s + ((x_s A[e_s]^T) * scale) B[e_s]^T        A (E, R, in), B (E, out, R), scale (R,)

never the dense (E, out, in) delta PEFT's ParamWrapper builds at every call. Two forms, after
transformers' experts implementations (``set_experts_implementation``):

- ``batched_mm``: the graph gathers ``W[ids]`` (S, out, in) and runs ``bmm(W[ids], x)`` with x
  (S, in, 1). The branch gathers ``A[ids]`` / ``B[ids]`` and adds two bmm's:
  ``baddbmm(y, B[ids], bmm(A[ids], x) * scale)``.
- ``grouped_mm``: the graph runs ``grouped(x, W.transpose(-2, -1), offs)`` over rows sorted by
  expert (``torch.nn.functional.grouped_mm``, ``torch._grouped_mm`` or transformers'
  ``grouped_mm_fallback``). The branch adds two grouped matmuls of the same op over the same
  offsets: ``grouped(grouped(x, A^T, offs) * scale, B^T, offs)``.

Any other read of the parameter (the eager loop's ``W[e]``, a transposed layout, a body of a
higher-order op) is refused by :func:`expert_branch_problems`, naming it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from ..graph import Site, call, tensor_meta
from .branch import _cast, _restore_dtype

aten = torch.ops.aten

GATHER_OPS = (operator.getitem, aten.index.Tensor)
BMM_OPS = (torch.bmm, aten.bmm.default)
TRANSPOSE_OPS = (torch.transpose, aten.transpose.int)


def _grouped_ops() -> tuple:
    """The grouped matmuls an experts implementation may call (those this torch / transformers have)."""
    ops = [getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None),
           getattr(aten, "_grouped_mm", None), getattr(getattr(aten, "_grouped_mm", None), "default", None)]
    ops += [fallback, getattr(fallback, "default", None)] if (fallback := _fallback()) is not None else []
    return tuple(op for op in ops if op is not None)


@dataclass
class ExpertRead:
    """One op computing with the expert parameter: ``form`` "batched" (``node`` the bmm, ``ids``
    the gather's index) or "grouped" (``node`` the grouped matmul)."""

    form: str
    node: fx.Node
    ids: fx.Node | None = None


def _is_last_two_transpose(node: fx.Node) -> bool:
    dims = node.args[1:3] if len(node.args) >= 3 else ()
    if (node.op == "call_method" and node.target == "transpose") or node.target in TRANSPOSE_OPS:
        return sorted(d % 3 if isinstance(d, int) else -1 for d in dims) == [1, 2]
    return False


def _read(user: fx.Node, w: fx.Node, grouped: tuple) -> list[ExpertRead] | str:
    """The expert reads behind one user of the parameter ``w``, or what it found instead."""
    if user.op == "call_function" and user.target in GATHER_OPS and user.args[0] is w:
        ids = user.args[1][0] if user.target is aten.index.Tensor and len(user.args[1]) == 1 else user.args[1]
        meta = tensor_meta(ids)
        if not isinstance(ids, fx.Node) or (meta is not None and (meta.dim() != 1 or meta.is_floating_point())):
            return f"W[{ids}] (expected a gather by a 1-D tensor of expert ids)"
        reads = [ExpertRead("batched", u, ids) for u in user.users
                 if u.op == "call_function" and u.target in BMM_OPS and u.args[0] is user]
        if len(reads) != len(user.users):
            return f"W[ids] read by {sorted(_name(u) for u in user.users)} (expected bmm(W[ids], x))"
        return reads
    if user.args and user.args[0] is w and _is_last_two_transpose(user):
        reads = [ExpertRead("grouped", u) for u in user.users
                 if u.op == "call_function" and u.target in grouped and len(u.args) >= 2 and u.args[1] is user
                 and _offsets(u) is not None]
        if len(reads) != len(user.users):
            return f"W.transpose(-2, -1) read by {sorted(_name(u) for u in user.users)} " \
                   "(expected a grouped matmul with offs)"
        return reads
    return _name(user)


def _name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _fallback() -> object | None:
    """transformers' grouped matmul (a loop of mm over the groups, with autograd; any dtype)."""
    return getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)


def _grouped_op(node: fx.Node, dtype: torch.dtype, rank: int) -> object | None:
    """The grouped matmul for the update of ``node`` in ``dtype`` at rank budget ``rank``: the
    graph's own, or transformers' fallback where torch's grouped_mm would refuse the operands (it
    takes bf16 alone under compile on CPU, and rows strided by a multiple of 16 bytes)."""
    meta = tensor_meta(node.args[0])
    if node.target is _fallback() or meta is None:
        return node.target
    fits = meta.dtype == dtype and rank * dtype.itemsize % 16 == 0
    return node.target if fits else _fallback()


def _offsets(node: fx.Node) -> fx.Node | None:
    return node.kwargs.get("offs", node.args[2] if len(node.args) > 2 else None)


def expert_reads(site: Site) -> list[ExpertRead] | list[str]:
    """Every op computing with the expert parameter of ``site`` (a "param" site), or, when some
    read is none lora_fx can rewrite, what it found there (descriptions of those reads)."""
    grouped, reads, odd = _grouped_ops(), [], []
    for user in site.node.users:
        got = _read(user, site.node, grouped)
        (odd.append if isinstance(got, str) else reads.extend)(got)
    return odd or reads


def expert_branch_problems(site: Site, implementation: str | None, dtype: torch.dtype, rank: int) -> list[str]:
    """Why the routed branch cannot be added at this expert parameter in ``dtype`` at rank budget
    ``rank`` (empty when it can)."""
    got = expert_reads(site)
    if got and all(isinstance(r, ExpertRead) for r in got):
        odd = [r.node for r in got if r.form == "grouped" and _grouped_op(r.node, dtype, rank) is None]
        base = tensor_meta(odd[0].args[0]).dtype if odd else None
        return [f"{site.fqn}: the graph's grouped matmul ({_name(odd[0])}) takes {base} operands whose rows are "
                f"multiples of 16 bytes, the update's are {dtype} of rank {rank}, and transformers' "
                f"grouped_mm_fallback is not registered to compute it instead; load the adapter with dtype={base} "
                "and a max_rank whose rows fill 16 bytes, or use mode='fold'"] if odd else []
    found = "; ".join(got) if got else "nothing"
    impl = repr(implementation) if implementation else "unknown"
    return [f"{site.fqn}: branch mode adds each expert's low-rank update where the experts' computation reads the "
            f"parameter (batched_mm's bmm(W[ids], x) or grouped_mm's grouped(x, W^T, offs)); with experts "
            f"implementation {impl} the graph reads it as {found}; call model.set_experts_implementation('batched_mm') "
            "(or 'grouped_mm') before compiling, or use mode='fold'"]


def insert_expert_branches(sites: list[Site], tensors: Callable[[Site], tuple[dict[str, fx.Node], torch.dtype]],
                           rank: int) -> int:
    """Add the routed update at every op reading each site's expert parameter (checked with
    :func:`expert_branch_problems` first); ``tensors(site)``: its lora_a, lora_b, scale nodes and
    the adapter's dtype; ``rank``: the rank budget R. Returns the number of ops given an update."""
    count = 0
    for site in sites:
        t, dtype = tensors(site)
        for read in expert_reads(site):
            assert isinstance(read, ExpertRead), read
            _insert(site.graph, read, t, dtype, rank)
            count += 1
    return count


def _insert(graph: fx.Graph, read: ExpertRead, t: dict[str, fx.Node], dtype: torch.dtype, rank: int) -> None:
    y = read.node
    users = list(y.users)
    with graph.inserting_before(y.next):
        x = _cast(graph, y.args[1] if read.form == "batched" else y.args[0], dtype)
        if read.form == "batched":  # x (S, in, 1), y (S, out, 1)
            gather = lambda w: call(graph, aten.index.Tensor, (w, [read.ids]))  # noqa: E731
            h = call(graph, aten.bmm.default, (gather(t["lora_a"]), x))  # (S, R, 1)
            h = call(graph, aten.mul.Tensor, (h, call(graph, aten.unsqueeze.default, (t["scale"], -1))))
            out = call(graph, aten.baddbmm.default, (_cast(graph, y, dtype), gather(t["lora_b"]), h))
        else:  # x (S, in), y (S, out); a grouped op over the same offsets
            offs, op = _offsets(y), _grouped_op(y, dtype, rank)
            grouped = lambda a, w: call(graph, op, (a, call(graph, aten.transpose.int, (w, -2, -1))),  # noqa: E731
                                        {"offs": offs})
            h = call(graph, aten.mul.Tensor, (grouped(x, t["lora_a"]), t["scale"]))  # (S, R)
            out = call(graph, aten.add.Tensor, (_cast(graph, y, dtype), grouped(h, t["lora_b"])))
        out = _restore_dtype(graph, out, y, dtype)
    for user in users:
        user.replace_input_with(y, out)
