"""The backup pool of one primary: its members and which one to recycle next."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum

from pyroaring import BitMap

from mirrorpool.mirror.journal import BitmapFile
from mirrorpool.store import FileStore


class MemberState(StrEnum):
    SPARE = "spare"  # never used: blank
    ACTIVE = "active"  # mirrors the primary (in-sync once nothing is pending)
    GENERATION = "generation"  # frozen point-in-time copy
    FAILED = "failed"  # an I/O error made its content unknown


@dataclass(eq=False)
class Member:
    idx: int
    store: FileStore
    state: MemberState = MemberState.SPARE
    gen: int | None = None
    # Order of last use: the sequence number at which it stopped being active.
    last_used: int = 0
    # Chunks whose content must still be copied from the primary.
    pending: BitMap = field(default_factory=BitMap)
    pinned: bool = False
    readers: int = 0
    frozen_seq: int | None = None
    split_done: threading.Event = field(default_factory=threading.Event)
    # mutations ordered before the split that made this generation, until all finished
    split_earlier: list = field(default_factory=list)
    copy_total: int = 0  # chunks to copy when the current resync started
    pending_file: BitmapFile | None = None  # the pending set, kept exact across crashes
    epoch: int = 0  # bumped whenever chunks are marked pending anew
    # Copied in big runs since its cache was last dropped: its page cache holds
    # large folios, which make every later 4 KiB write into it several times dearer.
    bulk_copied: bool = False
    # writes the member back and drops its cache after a bulk copy (see MirroredVolume)
    dropper: threading.Thread | None = None

    def save_pending(self) -> None:
        if self.pending_file is not None:
            self.pending_file.save(self.pending)

    def add_pending(self, added: BitMap) -> None:
        """Chunks this member must copy (again), in memory and in its file."""
        self.pending |= added
        if self.pending_file is not None:
            self.pending_file.mark(added)

    def pending_cleared(self, cleared: BitMap) -> None:
        """``cleared`` left ``pending`` (copied): make the file say so."""
        if self.pending_file is not None:
            self.pending_file.clear(cleared)

    @property
    def syncing(self) -> bool:
        return bool(self.pending)

    @property
    def recyclable(self) -> bool:
        if self.state is MemberState.ACTIVE:
            return False
        return not self.pinned and self.readers == 0

    def why_kept(self) -> str:
        if self.pinned:
            return f"generation {self.gen} is pinned"
        if self.readers:
            return f"generation {self.gen} is being read through an export"
        return f"member {self.idx} is the active backup"


def recycle_order(members: list[Member], exclude: Member | None = None) -> list[Member]:
    """Members that may be recycled, least recently used first (blank and failed ones first)."""
    candidates = [m for m in members if m is not exclude and m.recyclable]

    def key(m: Member) -> tuple[int, int]:
        rank = 0 if m.state in (MemberState.SPARE, MemberState.FAILED) else 1
        return rank, m.last_used if m.gen is None else m.gen

    return sorted(candidates, key=key)
