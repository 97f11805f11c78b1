"""Export names hosts can open, and what stands behind each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mirrorpool.device.device import Device, LogicalUnit
from mirrorpool.nbd.constants import BASE_ALLOCATION
from mirrorpool.store import BlockStore, Extent

# A metadata context turns a range into (length, flags) runs for BLOCK_STATUS.
ContextSource = Callable[[int, int], list[Extent]]


@dataclass
class Export:
    name: str
    lu: LogicalUnit
    store: BlockStore
    read_only: bool
    description: str
    contexts: dict[str, ContextSource] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.store.size


def resolve_export(device: Device, name: str) -> Export | None:
    """The export a host asked for by name, or None if there is none."""
    lu = device.find_lu(name)
    if lu is None:
        return None
    return Export(
        name=name,
        lu=lu,
        store=lu.store,
        read_only=False,
        description=f"mirrorpool LU {lu.name} ({lu.record.uuid})",
        contexts={BASE_ALLOCATION: lu.store.extents},
    )


def list_exports(device: Device) -> list[tuple[str, str]]:
    return [(lu.name, f"mirrorpool LU {lu.name}") for lu in device.list_lus()]


def match_contexts(export: Export, queries: tuple[str, ...]) -> list[str]:
    """Context names selected by SET/LIST_META_CONTEXT queries ("ns:" selects a namespace)."""
    available = list(export.contexts)
    if not queries:
        return available
    chosen: list[str] = []
    for query in queries:
        for name in available:
            hit = name == query or (query.endswith(":") and name.startswith(query))
            if hit and name not in chosen:
                chosen.append(name)
    return chosen
