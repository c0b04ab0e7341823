"""Substitute pass: replace a parameter of the graph by the adapter's full tensor.

Used for modules_to_save and for biases saved with bias="all" / "lora_only".
"""

from __future__ import annotations

from torch import fx


def substitute_tensors(graph: fx.Graph, replacements: dict[fx.Node, fx.Node]) -> int:
    """Route every use of each old node to its new node."""
    for old, new in replacements.items():
        old.replace_all_uses_with(new)
    return len(replacements)
