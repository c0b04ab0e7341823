"""Serving more adapters than fit: a registry of named adapters over N compiled slots.

    be = lora_fx.backend({"sql": "adapters/sql", "chat": chat}, slots=8, max_rank=16)
    model.forward = torch.compile(model.forward, backend=be, dynamic=True)
    be.register("customer_x", "adapters/customer_x")      # any number, any time
    with be.using(["sql", None, "customer_x"]):           # one name (or None) per row
        out = model(input_ids)                             # 3 rows, each with its own adapter

The graphs are compiled once for N slots (internal names ``slot0`` .. ``slotN-1``) and the union
of the registry's modules and ranks (as ``reserve=`` does). ``using`` makes its rows' adapters
resident: one already in a slot is taken as it is; a missing one is read (from the host cache, or
from disk without holding any lock) and copied into a free slot, or the least recently used one
that no running ``using`` block holds and no ``pin`` keeps. A block takes all its slots at once or
none (it waits holding nothing, so two blocks never wait on each other). Each thread's selection is
its own: every compiled call writes the calling thread's rows into the graphs' selection under the
backend lock (``Selection.apply``), so threads running blocks concurrently never compute a row
with another row's adapter. A block whose rows are all None runs graphs compiled without the
branch, at the base model's cost.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from .adapter import Adapter
from .backend import LoraBackend
from .errors import SwapError, raise_if
from .loading import load_adapter
from .slots import AdapterSet

Source = Adapter | str | os.PathLike
HOST_BYTES = 1 << 30  # default host cache for adapters read from disk


def adapter_bytes(adapter: Adapter) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.state_dict().values())


class Registry:
    """Name -> an Adapter held as given, or a PEFT directory read on demand into a host cache
    bounded by ``host_bytes`` (least recently used first out). Reads of one name are shared."""

    def __init__(self, host_bytes: int):
        self.sources: dict[str, Source] = {}
        self.host_bytes = host_bytes
        self.cache: OrderedDict[str, tuple[Adapter, int]] = OrderedDict()
        self.reading: dict[str, Future] = {}
        self.lock = threading.Lock()
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="lora_fx-loader")

    def adapter(self, name: str) -> Adapter:
        """The adapter ``name`` (read from disk if it is not held), without holding any backend lock."""
        with self.lock:
            src = self.sources[name]
            if isinstance(src, Adapter):
                return src
            if name in self.cache:
                self.cache.move_to_end(name)
                return self.cache[name][0]
            fut = self.reading.get(name)
            mine = fut is None
            if mine:
                fut = self.reading[name] = Future()
        if not mine:
            return fut.result()
        try:
            adapter = load_adapter(src, name=name)
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self.lock:
                self.reading.pop(name, None)
        self.keep(name, adapter)
        fut.set_result(adapter)
        return adapter

    def keep(self, name: str, adapter: Adapter) -> None:
        with self.lock:
            if isinstance(self.sources.get(name), Adapter):
                return
            self.cache[name] = (adapter, adapter_bytes(adapter))
            while sum(n for _, n in self.cache.values()) > self.host_bytes and len(self.cache) > 1:
                self.cache.popitem(last=False)

    def forget(self, name: str) -> None:
        with self.lock:
            self.sources.pop(name, None)
            self.cache.pop(name, None)


class Residency:
    """Which name each slot holds, who is using it and when it was last used (one condition)."""

    def __init__(self, slots: int):
        self.names: list[str | None] = [None] * slots
        self.where: dict[str, int] = {}
        self.users = [0] * slots
        self.used = [0] * slots  # the tick of each slot's last acquire (LRU)
        self.ready = [threading.Event() for _ in range(slots)]
        for e in self.ready:
            e.set()
        self.pins: set[str] = set()
        self.tick = 0
        self.evictions = 0
        self.cond = threading.Condition()

    def acquire(self, names: set[str], timeout: float | None) -> tuple[dict[str, int], list[int]]:
        """Slots for ``names``, all at once: (name -> slot, the slots this caller must fill).

        Raises:
            SwapError: more names than slots the pins leave, or no slot free within ``timeout``.
        """
        room = len(self.names) - len(self.pins - names)
        if len(names) > room:
            raise SwapError(f"using: expected at most {room} distinct adapters in one block ({len(self.names)} "
                            f"slots, {len(self.pins - names)} pinned by others), found {len(names)}; split the "
                            "batch, unpin adapters or build the backend with more slots")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                need = sorted(names - set(self.where))
                free = sorted((s for s, n in enumerate(self.names)
                               if self.users[s] == 0 and (n is None or n not in names and n not in self.pins)),
                              key=lambda s: (self.names[s] is not None, self.used[s]))
                if len(free) >= len(need):
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise SwapError(f"using: expected {len(need)} free slots for {need} within {timeout} s, found "
                                    f"{len(free)}: every other slot is held by a running using block or a pin")
                self.cond.wait(left)
            fill = []
            for name, s in zip(need, free):
                if self.names[s] is not None:
                    del self.where[self.names[s]]  # evicted: no block holds it
                    self.evictions += 1
                self.names[s], self.where[name] = name, s
                self.ready[s] = threading.Event()
                fill.append(s)
            self.tick += 1
            held = {n: self.where[n] for n in names}
            for s in held.values():
                self.users[s] += 1
                self.used[s] = self.tick
            return held, fill

    def release(self, slots: Sequence[int], failed: Sequence[int] = ()) -> None:
        with self.cond:
            for s in slots:
                self.users[s] -= 1
            for s in failed:
                self.where.pop(self.names[s], None)
                self.names[s] = None
                self.ready[s].set()
            self.cond.notify_all()


class PoolBackend(LoraBackend):
    """A branch-mode backend serving a registry of any number of adapters through ``slots`` compiled
    slots (see the module docstring). Built by ``lora_fx.backend(registry, slots=N)``.

    Args:
        registry: name -> Adapter or PEFT directory. The graphs hold the union of their modules and
            ranks, with ``reserve`` and ``max_rank``: a later ``register`` must fit it.
        slots: how many adapters are resident at once (device memory: N stacked A / B).
        host_bytes: the most bytes of adapters read from disk kept in host memory (default 1 GiB);
            an Adapter passed as itself is held as given.
    """

    base_graphs = True

    def __init__(self, registry: Mapping[str, Source], *, slots: int, host_bytes: int | None = None,
                 mode: str = "branch", reserve: Sequence[Any] = (), **kw: Any):
        raise_if([f"slots: expected an int >= 1, found {slots!r}"] * (not isinstance(slots, int) or slots < 1)
                 + [f"mode: expected 'branch' for a pool of slots, found {mode!r}"] * (mode != "branch")
                 + [f"registry: expected a mapping name -> Adapter or PEFT directory, found {type(registry).__name__}"]
                 * (not isinstance(registry, Mapping)), SwapError, "cannot build the adapter pool:")
        self.registry = Registry(HOST_BYTES if host_bytes is None else host_bytes)
        self.registry.sources.update(registry)
        given = [self.registry.adapter(n) for n in registry]  # read once: the graphs are built for them
        raise_if([] if given or reserve else ["expected adapters to build the graphs for (a registry, or reserve= "
                                              "adapters with the modules and ranks to serve), found none"],
                 SwapError, "cannot build the adapter pool:")
        self.slot_names = [f"slot{i}" for i in range(slots)]
        super().__init__(dict.fromkeys(self.slot_names), mode="branch", reserve=[*given, *reserve], **kw)
        self.residency = Residency(slots)
        self._held: list[int] = []  # the slots ``select`` holds

    def register(self, name: str, adapter: Source) -> None:
        """Add ``adapter`` (an Adapter, or a PEFT directory read now to check it and again on demand).

        Raises:
            SwapError: the name is taken, or the adapter does not fit the compiled graphs (modules,
                rank, variant: build the backend with it in the registry or ``reserve=``).
        """
        if name in self.registry.sources:
            raise SwapError(f"register: {name!r} is already registered; unregister it first")
        loaded = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, name=name)
        raise_if(self.state.layout.problems(AdapterSet({name: loaded}), "branch"), SwapError,
                 f"cannot register {name!r} without recompiling; build the backend with it (in the registry or "
                 "reserve=), or:")
        self.registry.sources[name] = adapter
        self.registry.keep(name, loaded)

    def unregister(self, name: str) -> None:
        """Remove ``name``; its slot (if resident) is free again.

        Raises:
            SwapError: unknown, or held by a running ``using`` block (or ``select``).
        """
        self._known([name])
        r = self.residency
        with r.cond:
            s = r.where.get(name)
            if s is not None and r.users[s]:
                raise SwapError(f"unregister: {name!r} is in use by {r.users[s]} running using block(s) / select; "
                                "unregister it after they end")
            if s is not None:
                r.names[s] = None
                del r.where[name]
            r.pins.discard(name)
            self.registry.forget(name)

    def pin(self, name: str) -> None:
        """Load ``name`` now and keep it resident until ``unpin``."""
        with self.using([name]), self.residency.cond:
            self.residency.pins.add(name)

    def unpin(self, name: str) -> None:
        with self.residency.cond:
            self.residency.pins.discard(name)
            self.residency.cond.notify_all()

    def prefetch(self, names: Sequence[str]) -> list[Future]:
        """Read ``names`` from disk into the host cache on the loader thread (a later ``using`` then
        only copies them into a slot)."""
        self._known(names)
        return [self.registry.loader.submit(self.registry.adapter, n) for n in names]

    def resident(self) -> dict[str, int]:
        """Name -> slot of the adapters resident now."""
        with self.residency.cond:
            return dict(self.residency.where)

    @contextmanager
    def using(self, rows: Sequence[str | None], beams: int = 1,
              timeout: float | None = None) -> Iterator[dict[str, int]]:
        """Within the block, this thread's calls compute row i with adapter ``rows[i]`` (None: the
        base model), each repeated for ``beams`` rows; a call with another batch size raises.
        Yields the slot of each name.

        Raises:
            SwapError: unknown names, bad rows / beams, more distinct names than slots, or no slot
                free within ``timeout`` seconds (None: wait).
        """
        slots = self._hold(rows, beams, timeout)
        self.state.selection.push(tuple(slots[n] + 1 if n is not None else 0 for n in rows), beams)
        try:
            yield dict(slots)
        finally:
            self.state.selection.pop()
            self.residency.release(list(slots.values()))

    def select(self, rows: Sequence[str | None], beams: int = 1) -> None:
        """Every thread's calls (outside ``using`` blocks) use ``rows``, resident until the next select."""
        slots = self._hold(rows, beams, None)
        with self.lock:
            self.state.selection.default = (tuple(slots[n] + 1 if n is not None else 0 for n in rows), beams)
        self.residency.release(self._held)
        self._held = list(slots.values())

    def swap(self, adapters: Any) -> None:
        raise SwapError("swap: a pool backend's slots are filled by using / select; add adapters with "
                        "register(name, adapter) and remove them with unregister(name)")

    def _known(self, names: Sequence[str | None]) -> None:
        raise_if([f"{n!r}: not registered (register(name, adapter) first)" for n in dict.fromkeys(names)
                  if n is not None and n not in self.registry.sources], SwapError, "unknown adapters:")

    def _hold(self, rows: Sequence[str | None], beams: int, timeout: float | None) -> dict[str, int]:
        """Make the rows' adapters resident and hold their slots (name -> slot)."""
        self._known(rows)
        self.state.selection.slots_of([self.slot_names[0] if r is not None else None for r in rows], beams)
        slots, fill = self.residency.acquire({r for r in rows if r is not None}, timeout)
        failed: list[int] = []
        try:
            for s in fill:
                adapter = self.registry.adapter(self.residency.names[s])  # no lock held while reading
                tensors = self.state.slot_tensors(self.slot_names[s], adapter)  # nor while padding
                with self.lock:  # no running block holds this slot: only the copies
                    self.state.fill_slot(self.slot_names[s], adapter, tensors)
                self.residency.ready[s].set()
                fill = [x for x in fill if x != s]
            for s in slots.values():  # filled by another block
                self.residency.ready[s].wait()
            lost = [n for n, s in slots.items() if self.residency.names[s] != n]
            raise_if([f"{n!r}: its load failed in another thread" for n in lost], SwapError, "cannot use:")
        except BaseException:
            failed = fill
            self.residency.release(list(slots.values()), failed)
            raise
        return slots
