"""A and B on several processes: attached to their modules for FSDP2, laid out for tensor parallel.

``LoraState.attach`` registers A and B as parameters of their modules (``lora_fx_A`` /
``lora_fx_B``) so FSDP2 shards them and reduces their gradients; once ``parallelize_module`` has
sharded a module's weight, ``_settle`` lays A and B out as the op needs them. The helpers read and
write whole tensors of (possibly sharded) parameters.
"""

from __future__ import annotations

import torch

from .errors import GraphRewriteError, raise_if
from .experts import module_of
from .slots import ModuleSpec

# A / B's names on their modules once attached (then lora_B's bias and DoRA's magnitude, where trained)
ATTACHED = {"lora_a": "lora_fx_A", "lora_b": "lora_fx_B", "lora_b_bias": "lora_fx_B_bias",
            "magnitude": "lora_fx_magnitude"}

SAVED = "lora_fx_saved_"  # a modules_to_save copy's name on its module once attached: lora_fx_saved_<param>


def attached_name(fqn: str, spec: ModuleSpec, role: str) -> str:
    """The attribute A / B (``role``) of ``fqn`` has on its module once attached: an experts module
    holds one pair per adapted 3-D parameter, ``lora_fx_A_<param>`` / ``lora_fx_B_<param>``."""
    return f"{ATTACHED[role]}_{fqn.rpartition('.')[2]}" if spec.experts else ATTACHED[role]


def is_attached_name(name: str) -> bool:
    """Whether a parameter's name (``model.named_parameters()``) is one ``attach`` registered."""
    last = name.rpartition(".")[2]
    return last in ATTACHED.values() or last.startswith(("lora_fx_A_", "lora_fx_B_", SAVED))


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; a collective for a DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole tensor ``full`` into ``param``, each rank its own shard when it is a DTensor."""
    with torch.no_grad():
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            # every rank holds the same full tensor: each takes its shard without communicating
            param.copy_(distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                          src_data_rank=None))
        else:
            param.copy_(full)


def _lora_placements(fqn: str, weight: torch.Tensor, spec: ModuleSpec) -> tuple[tuple, tuple]:
    """A's and B's placements for a tensor-parallel base weight (see ``LoraState._settle``)."""
    from torch.distributed.tensor import Replicate, Shard


    rep = tuple(Replicate() for _ in weight.placements)
    if spec.embedding or spec.kernel or len(weight.placements) != 1:
        what = "an embedding" if spec.embedding else "a conv" if spec.kernel else "a multi-dimensional mesh"
        raise GraphRewriteError(f"{fqn}: tensor parallel over {what} is not supported; expected a Linear with "
                                "ColwiseParallel or RowwiseParallel")
    pl = weight.placements[0]
    if pl == Shard(0):
        return rep, (Shard(0),)
    if pl == Shard(1):
        return (Shard(1),), rep
    if pl == Replicate():
        return rep, rep
    raise GraphRewriteError(f"{fqn}: its weight is laid out as {weight.placements}; expected Shard(0) (colwise), "
                            "Shard(1) (rowwise) or Replicate() for the adapter to follow")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "to_local") else t


class Distributed:
    """``LoraState``'s attach and tensor-parallel placement (a mixin: the state's own attributes)."""

    def _settle(self) -> None:
        """Tensor parallel: once ``parallelize_module`` sharded a module's weight, lay its A and B
        out as the op needs them (colwise weight Shard(0): A replicated, B Shard(0); rowwise
        Shard(1): A Shard(1), B replicated), so DTensor computes the branch on each rank's shard
        and reduces it with the base's partial output. FSDP2's shards are left to FSDP2."""
        if self._fsdp:
            return
        checked = False
        for fqn, mod in self.attached.items():
            w = getattr(mod, "weight", None)
            if not hasattr(w, "device_mesh") or self.layout.specs[fqn].experts:
                continue
            if not checked:  # a sharded weight: FSDP2's (left alone from now on) or tensor parallel's
                raise_if([f"{f}: DoRA's norm needs the full A and B on every rank" for f in self.attached
                          if self.layout.specs[f].dora], GraphRewriteError, "cannot run the attached adapter sharded:")
                if any(type(m).__name__.startswith("FSDP") for m in self._model.modules()):
                    self._fsdp = True
                    return
                checked = True
            for attr, placements in zip(ATTACHED.values(), _lora_placements(fqn, w, self.layout.specs[fqn])):
                p = getattr(mod, attr)
                if getattr(p, "placements", None) == placements and getattr(p, "device_mesh", None) == w.device_mesh:
                    continue
                from torch.distributed.tensor import distribute_tensor

                new = distribute_tensor(_full(p).detach(), w.device_mesh, placements, src_data_rank=None)
                mod.register_parameter(attr, torch.nn.Parameter(new, requires_grad=p.requires_grad))

    def attach(self, model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> None:
        """Register A and B as parameters of their modules (``lora_fx_A`` / ``lora_fx_B``), so the
        model's own machinery manages them: FSDP2 shards them and reduces their gradients, the
        optimizer sees the sharded parameters, and each compiled call reads the module's current
        (unsharded) tensors. Must come before the model is wrapped.

        Raises:
            GraphRewriteError: fold mode or mixed batches; a grouped conv (its derived tensors
                need the full A / B on every rank; DoRA's too: refused once the model runs sharded);
                a module already sharded.
        """

        problems = []
        if self.mode != "branch" or self.mixed:
            problems.append("attach: expected a branch-mode backend with one adapter set (fold mode has nothing to "
                            "train; its W' follows the base weight wherever it lives)")
        for fqn in self._own:
            spec = self.layout.specs[fqn]
            mod = modules.get(module_of(fqn, spec))
            if mod is None:
                problems.append(f"{fqn}: the model has no such module")
                continue
            if spec.groups > 1:
                problems.append(f"{fqn}: a grouped conv cannot be attached (its derived tensors need the full A "
                                "and B on every rank)")
            if any(type(t).__name__ == "DTensor" for t in mod.parameters(recurse=False)) or \
                    type(model).__name__.startswith("FSDP"):
                problems.append(f"{fqn}: its module is already sharded (FSDP2 / tensor parallel); call "
                                "be.attach(model) before fully_shard / parallelize_module")
        for path in self.saved:  # modules_to_save copies: lora_fx_saved_<param> on the copied module
            mod = modules.get(path.rpartition(".")[0])
            if mod is None:
                problems.append(f"{path}: the model has no such module (the adapter's modules_to_save copy)")
            elif any(type(t).__name__ == "DTensor" for t in mod.parameters(recurse=False)):
                problems.append(f"{path}: its module is already sharded (FSDP2 / tensor parallel); call "
                                "be.attach(model) before fully_shard / parallelize_module")
        raise_if(problems, GraphRewriteError, "cannot attach the adapter to this model:")
        self._model, self._fsdp = model, False
        for path, p in self.saved.items():
            module, _, param = path.rpartition(".")
            if getattr(modules[module], SAVED + param, None) is not p:
                modules[module].register_parameter(SAVED + param, p)
        for fqn, t in self._own.items():
            mod = modules[module_of(fqn, self.layout.specs[fqn])]
            for role in t:
                name = attached_name(fqn, self.layout.specs[fqn], role)
                if getattr(mod, name, None) is not t[role]:
                    mod.register_parameter(name, t[role])
            self.attached[fqn] = mod
