"""Errors a user can cause. Each names the module (fqn), what was expected and what was found."""

from __future__ import annotations


class LoraFxError(Exception):
    """Base class of every error lora_fx raises on bad input.

    ``problems`` holds one line per problem; the message lists them all, so a user fixes every
    problem in one round instead of one per run.
    """

    def __init__(self, problems: str | list[str], *, header: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = self.problems if header is None else [header, *("  - " + p for p in self.problems)]
        super().__init__("\n".join(lines))


class AdapterConfigError(LoraFxError, ValueError):
    """adapter_config.json is missing, unreadable, of the wrong types, or asks for an unsupported variant."""


class AdapterWeightsError(LoraFxError, ValueError):
    """The weight file is missing, unreadable, or its tensors disagree with the config or each other."""


class ModelMismatchError(LoraFxError, ValueError):
    """The adapter does not fit the model it is applied to."""


class GraphRewriteError(LoraFxError, ValueError):
    """A graph cannot be rewritten: an op not found, a graph rewritten twice, an op without a module."""


class SwapError(LoraFxError, ValueError):
    """A swap, selection or scale change that the compiled graph cannot take without recompiling."""


class StaleWeightError(LoraFxError, RuntimeError):
    """A weight that holds an in-place fold was changed behind lora_fx's back."""


class UnpicklableError(LoraFxError, TypeError):
    """A backend was pickled: it holds live state (the adapter tensors it updates in place, its
    compiled graphs, a lock) that a copy would not share. It is passed by reference instead."""


class RecompileLimitError(LoraFxError, RuntimeError):
    """Dynamo's recompile limit was reached for a frame that applies a LoRA adapter (dynamo would
    run it without the adapter from then on)."""


def raise_if(problems: list[str], error: type[LoraFxError], header: str) -> None:
    """Raise ``error`` listing every problem, if there are any."""
    if problems:
        raise error(problems, header=header)


_PASSING: dict[type, type] = {}


def through_dynamo(e: LoraFxError) -> LoraFxError:
    """``e`` as an error dynamo lets through from a backend as it is (dynamo wraps any other in its
    ``BackendCompilerFailed``, which ``except lora_fx.LoraFxError`` would miss): the same class with
    dynamo's ``ShortenTraceback`` mixed in, which dynamo re-raises with its own frames cut."""
    try:
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:  # pragma: no cover - a torch without it wraps as it always did
        return e
    cls = _PASSING.get(type(e))
    if cls is None:
        cls = _PASSING[type(e)] = type(type(e).__name__, (type(e), ShortenTraceback),
                                       {"__module__": type(e).__module__, "__init__": LoraFxError.__init__,
                                        "__doc__": type(e).__doc__})
    out = cls(e.problems)
    out.args, out.first_useful_frame = e.args, None
    out.__dict__.update({k: v for k, v in e.__dict__.items() if k != "first_useful_frame"})
    return out
