"""A and B: made from the adapters, written by swaps, trained, read back; on the model's device.

After the backend is built, A and B *are* the adapter: training and ``swap`` write them, settings
never do. ``trained_adapters`` and ``live_weights`` read them back per adapter (summed adapters sit
side by side along the rank).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .adapter import Adapter, LoraWeights, regrouped
from .distributed import _copy_full, _full
from .errors import AdapterConfigError, SwapError, raise_if
from .experts import padded_expert_ab, peft_layout
from .tensors import (
    bias_parts,
    padded_ab,
)

AB = ("lora_a", "lora_b")


class Weights:
    """``LoraState``'s A and B (a mixin: the state's own attributes)."""

    def _initial_ab(self, fqn: str, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of ``slots`` as the adapters hold them (stacked behind a zero slot when mixed)."""
        spec, rank = self.layout.specs[fqn], self.layout.rank
        if spec.experts:  # (E, R, in), (E, out, R); never mixed (see experts.mixed_problems)
            return padded_expert_ab(self.adapters.weights(0, fqn), rank, spec.experts, spec.shape, spec.dtype)
        pairs = [padded_ab(self.adapters.weights(k, fqn), rank, spec.shape, spec.kernel, spec.dtype, spec.embedding)
                 for k in slots]
        if not self.mixed:
            return pairs[0]
        zero = tuple(torch.zeros_like(t) for t in pairs[0])
        a, b = (torch.stack([zero[i]] + [p[i] for p in pairs]) for i in (0, 1))
        return (a.reshape(-1, rank) if spec.embedding else a), b  # embeddings: ((N + 1) * vocab, R)

    def _initial_extras(self, fqn: str) -> dict[str, torch.Tensor]:
        """What PEFT trains at module ``fqn`` besides A and B, as slot 0's adapters hold it (branch
        mode, one adapter set): ``lora_b_bias`` (out,), lora_B's bias (see :func:`bias_parts`), and
        ``magnitude`` (out,), DoRA's (ones without one: the graph's DoRA scale is then 1)."""
        spec = self.layout.specs[fqn]
        if self.mode != "branch" or self.mixed:
            return {}
        ws, out_f, t = self.adapters.weights(0, fqn), spec.shape[0], {}
        if spec.lora_bias:
            t["lora_b_bias"] = bias_parts(ws, out_f, spec.dtype)[0]
        if spec.dora:
            m = next((w.magnitude for w in ws if w.magnitude is not None), None)
            t["magnitude"] = torch.ones(out_f, dtype=spec.dtype) if m is None else m.reshape(-1).to(spec.dtype)
        return t

    def _write_ab(self, slots: Sequence[int]) -> None:
        """Copy the adapters' A and B of ``slots`` into the parameters (a swap; never a settings change),
        and their modules_to_save copies into the trained copies."""
        for path, p in self.saved.items():
            if path in self.adapters.overrides:
                _copy_full(p, self.adapters.overrides[path].to(p.device, p.dtype))
        for fqn, t in self.trainable.items():
            a, b = self._initial_ab(fqn, slots if self.mixed else [0])
            if not self.mixed:
                _copy_full(t["lora_a"], a)
                _copy_full(t["lora_b"], b)
                for role, v in self._initial_extras(fqn).items():
                    _copy_full(t[role], v)
                continue
            vocab = self.layout.specs[fqn].shape[1] if self.layout.specs[fqn].embedding else 0
            for i, k in enumerate(slots):
                self._copy_slot(fqn, k, a[(i + 1) * vocab:(i + 2) * vocab] if vocab else a[i + 1], b[i + 1])

    def _copy_slot(self, fqn: str, k: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write one slot's A / B of module ``fqn`` into the stacked tensors (slot 0 is all zeros)."""
        t, spec = self.trainable[fqn], self.layout.specs[fqn]
        if spec.embedding:
            vocab = spec.shape[1]
            t["lora_a"][(k + 1) * vocab:(k + 2) * vocab].copy_(a)
        else:
            t["lora_a"][k + 1].copy_(a)
        t["lora_b"][k + 1].copy_(b)

    def slot_tensors(self, name: str, adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``adapter``'s A / B for one slot of a mixed set, checked and padded as the graphs hold
        them: made without the state lock (they read only the layout), for :meth:`fill_slot`.

        Raises:
            SwapError: the adapter does not fit the compiled graphs.
        """
        from .slots import AdapterSet

        one = AdapterSet({name: adapter})
        raise_if(self.layout.problems(one, self.mode), SwapError, f"cannot load {name!r} without recompiling:")
        return {fqn: padded_ab(one.weights(0, fqn), self.layout.rank, spec.shape, spec.kernel, spec.dtype,
                               spec.embedding) for fqn, spec in self.layout.specs.items()}

    def fill_slot(self, slot: str, adapter: Adapter, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put ``adapter`` into mixed slot ``slot`` with its :meth:`slot_tensors` (hold the state
        lock; a swap of one slot that copies and nothing more)."""
        k = self.layout.names.index(slot)
        self.adapters = self.adapters.replace({slot: adapter})
        with torch.no_grad():
            for fqn, (a, b) in tensors.items():
                self._copy_slot(fqn, k, a, b)
        # this slot's row of each module's per-slot values, in place: the next call recomputes
        # nothing else (every module's, for every slot, when one cannot be done so)
        current = [d for d in self.derived.values() if d.generation == self.generation]
        if not all([self.refresh_slot(d, k) for d in current]):
            self.generation += 1

    def place(self, device: torch.device) -> None:
        """Keep A, B and the selection on the model's device (the parameters stay the same objects)."""
        if self.device == device:
            return
        with torch.inference_mode(False):  # never inference tensors (see refresh)
            self._place(device)

    def _place(self, device: torch.device) -> None:
        own = [] if self.attached else [*(p for t in self._own.values() for p in t.values()), *self.saved.values()]
        for p in own:  # attached: the model moves them
            p.data = p.data.to(device)
        if self.selection is not None:
            self.selection.to(device)
        self.device = device

    def parameters(self, as_peft: bool = False) -> list[torch.nn.Parameter]:
        """Branch mode's A and B, module by module; asking for them turns their gradients on.
        ``as_peft``: every parameter PEFT trains, lora_B's bias and DoRA's magnitude too.

        A grouped conv's B is held dense (block-diagonal); its gradient is masked to the blocks, so
        training keeps it grouped, as PEFT's grouped lora_B is."""
        refused = [f"{a.name or 'adapter'}: {a.config.inference_only}" for slot in self.adapters.slots for a in slot
                   if a.config.inference_only]
        raise_if(refused, AdapterConfigError, "cannot train these adapters: their eval forward is LoRA, their "
                 "training is not; lora_fx applies them for inference only:")
        if as_peft:
            specs = self.layout.specs
            raise_if([f"{fqn}: {n} summed adapters carry a lora_B bias; lora_fx trains one per module"
                      for fqn in self.trainable if (n := sum(w.bias is not None for w in self.adapters.weights(0, fqn)))
                      > 1] + [f"{fqn}: mixed-adapter batches apply its {'DoRA magnitude' if s.dora else 'lora_B bias'} "
                              "as a derived tensor, which is not trained; train one adapter set"
                              for fqn, s in specs.items() if self.mixed and (s.dora or s.lora_bias)]
                     + [f"{path}: mixed-adapter batches apply its modules_to_save copy as a derived tensor, which is "
                        "not trained; train one adapter set" for path in sorted(self.layout.copies) if self.mixed],
                     AdapterConfigError, "cannot train these adapters as PEFT would:")
        params = [p for t in self.trainable.values() for role, p in t.items() if as_peft or role in AB]
        params += list(self.saved.values()) if as_peft else []  # modules_to_save copies
        for p in params:
            p.requires_grad_(True)
        for fqn, t in self.trainable.items():
            b = t["lora_b"]
            if self.layout.specs[fqn].groups > 1 and not getattr(b, "_lora_fx_masked", False):
                b.register_hook(lambda grad, fqn=fqn: grad * self._b_blocks(fqn).to(grad))
                b._lora_fx_masked = True
        return params

    def _b_blocks(self, fqn: str) -> torch.Tensor:
        """1 where a grouped conv's dense B may be non-zero (the blocks of the slot's adapters), else 0."""
        ws = [dataclasses.replace(w, lora_b=torch.ones_like(w.lora_b)) for w in self.adapters.weights(0, fqn)]
        spec = self.layout.specs[fqn]
        return padded_ab(ws, self.layout.rank, spec.shape, spec.kernel, spec.dtype, spec.embedding)[1]

    def held(self) -> list[torch.Tensor]:
        """Every tensor lora_fx holds besides the model's own (A / B and the derived tensors)."""
        return [p for t in self.trainable.values() for p in t.values()] + list(self.saved.values()) + [
            t for d in self.derived.values() for t in d.tensors.values()]

    def trained_adapters(self) -> list[Adapter]:
        """The slot's adapters with A and B read back from the (trained) parameters."""
        if self.mode != "branch" or self.mixed:
            raise SwapError("trained_adapter: expected a branch-mode backend with one adapter set")
        out, offsets = [], dict.fromkeys(self.trainable, 0)
        for adapter in self.adapters.slots[0]:
            mods = {}
            for fqn, w in adapter.modules.items():
                t, at = self.trainable[fqn], offsets[fqn]
                full_a, full_b = _full(t["lora_a"]), _full(t["lora_b"])
                offsets[fqn] = at + w.rank
                if w.experts:  # (E, R, in) / (E, out, R) back to PEFT's (r * E, in) / (out, r * E)
                    a, b = peft_layout(full_a[:, at:at + w.rank], full_b[:, :, at:at + w.rank])
                    mods[fqn] = dataclasses.replace(w, lora_a=a.detach().cpu().clone(), lora_b=b.detach().cpu().clone())
                    continue
                a = full_a.T if w.embedding else full_a
                b = regrouped(full_b[:, at:at + w.rank], w.groups)
                mods[fqn] = dataclasses.replace(w, lora_a=a[at:at + w.rank].detach().cpu().clone(),
                                                lora_b=b.detach().cpu().clone(), **self._trained_extras(fqn, at, w))
            overrides = {path: self.saved[path].detach().cpu().clone() if path in self.saved else t
                         for path, t in adapter.overrides.items()}  # modules_to_save copies as trained
            out.append(dataclasses.replace(adapter, modules=mods, overrides=overrides))
        return out

    def _trained_extras(self, fqn: str, at: int, w: LoraWeights, live: bool = False) -> dict[str, torch.Tensor]:
        """The lora_B bias and DoRA magnitude of ``w`` (the adapter at rank offset ``at``) as the
        parameters hold them now, if it owns them (the only adapter with a bias, the first with a
        magnitude), in ``w``'s shapes; ``live``: differentiable, else detached copies on the CPU."""
        t, ws, out = self.trainable[fqn], self.adapters.weights(0, fqn), {}
        starts = [sum(v.rank for v in ws[:i]) for i in range(len(ws))]
        if "lora_b_bias" in t and w.bias is not None and sum(v.bias is not None for v in ws) == 1:
            out["bias"] = t["lora_b_bias"]
        if "magnitude" in t and w.magnitude is not None and \
                at == next(start for start, v in zip(starts, ws) if v.magnitude is not None):
            out["magnitude"] = t["magnitude"].reshape(w.magnitude.shape)
        return out if live else {k: _full(v).detach().cpu().clone() for k, v in out.items()}

    def live_weights(self, fqn: str, module: torch.nn.Module) -> list[LoraWeights]:
        """The LoRA of module ``fqn`` as the compiled graphs apply it now, for an eager call of
        ``module`` (see :mod:`lora_fx.eager`): each summed adapter's weights with the current A / B
        (branch mode: trained, differentiable), scales times the multiplier, on the module's device."""
        device = next((t.device for t in module.parameters(recurse=False)), None)
        ws = [w.to(device) for w in self.adapters.weights(0, fqn)]
        if self.mode == "branch":
            t, at, live = self.trainable[fqn], 0, []
            for w in ws:
                if w.experts:
                    a, b = peft_layout(t["lora_a"][:, at:at + w.rank], t["lora_b"][:, :, at:at + w.rank])
                    live.append(dataclasses.replace(w, lora_a=a.to(device), lora_b=b.to(device)))
                    at += w.rank
                    continue
                a = t["lora_a"].T if w.embedding else t["lora_a"]
                live.append(dataclasses.replace(w, lora_a=a[at:at + w.rank].to(device),
                                                lora_b=regrouped(t["lora_b"][:, at:at + w.rank], w.groups).to(device),
                                                **self._trained_extras(fqn, at, w, live=True)))
                at += w.rank
            ws = live
        return [w.scaled(self._multiplier) for w in ws]
