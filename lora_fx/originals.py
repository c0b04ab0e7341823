"""In-place fold keeps the weights it overwrites on disk, to put them back bit for bit."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class OriginalStore:
    """Exact copies of weights that in-place folding overwrites, kept on disk (not in memory)."""

    def __init__(self):
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="lora_fx_originals_")

    def _path(self, key: str) -> str:
        import os

        return os.path.join(self._dir.name, key + ".safetensors")

    def save(self, key: str, tensors: Sequence[torch.Tensor | None]) -> None:
        from safetensors.torch import save_file

        save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(tensors) if t is not None},
                  self._path(key))

    def restore(self, key: str, tensors: Sequence[torch.Tensor | None]) -> None:
        from safetensors import safe_open

        with safe_open(self._path(key), framework="pt") as f:
            for i, t in enumerate(tensors):
                if t is not None:
                    t.copy_(f.get_tensor(str(i)))
