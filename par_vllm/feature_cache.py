"""The vision tower's unreduced output of recent images and videos, kept by their content.

vLLM's encoder and prefix caches know an item by its content and its processor kwargs, and
under PAR those include the query: the same image under two questions must never share
reduced tokens. So a later turn of a conversation, which scores the image against a new
question, misses both, and the tower would encode the whole image again when PAR needs only
its unreduced rows to choose anew. This cache keeps those rows by the item's content alone
(its identity as stock vLLM computes it, which the processor ships as a field), in host
memory, so the device memory vLLM profiled at start-up is left as it was.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class FeatureCache:
    """Least recently used rows by key, within `capacity` bytes; a capacity of 0 keeps
    nothing. Rows go in and come out as copies, so neither side can change the other's."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 0
        self._rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def get(self, key: bytes | None, device: torch.device | str) -> torch.Tensor | None:
        rows = self._rows.get(key) if key else None
        if rows is None:
            return None
        self._rows.move_to_end(key)
        return rows.to(device, copy=True)

    def put(self, key: bytes | None, rows: torch.Tensor) -> None:
        nbytes = rows.numel() * rows.element_size()
        if not key or nbytes > self.capacity or key in self._rows:
            return
        self._rows[key] = rows.detach().to("cpu", copy=True)
        self.size += nbytes
        while self.size > self.capacity:
            _, evicted = self._rows.popitem(last=False)
            self.size -= evicted.numel() * evicted.element_size()

    def __contains__(self, key: bytes | None) -> bool:
        return bool(key) and key in self._rows

    def __len__(self) -> int:
        return len(self._rows)


def content_key(packed: torch.Tensor | None) -> bytes | None:
    """An item's content key from its field (the bytes of its identity; empty: none)."""
    if packed is None or packed.numel() == 0:
        return None
    return bytes(packed.tolist())


def pack_key(key: str | None) -> torch.Tensor:
    return torch.tensor(list(key.encode()) if key else [], dtype=torch.uint8)
