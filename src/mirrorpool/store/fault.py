"""A fault-injecting layer over any block store: EIO, ENOSPC, short writes, slow I/O.

Rules are set at run time (the control API exposes them when the device runs
with ``--fault-injection``).  A rule matches an operation kind and optionally
a byte range; it fires after ``after`` matching operations, ``times`` times
(0: for ever).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from mirrorpool.nbd.constants import Errno
from mirrorpool.store.base import BlockStore, Extent, StoreError

OPS = ("read", "write", "zero", "trim", "flush", "any")
EFFECTS = ("eio", "enospc", "short", "delay")


@dataclass
class FaultRule:
    op: str = "write"
    effect: str = "eio"
    offset: int = 0
    length: int = 0  # 0: to the end
    after: int = 0
    times: int = 0
    delay: float = 0.0
    seen: int = 0
    fired: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def matches(self, op: str, offset: int, length: int) -> bool:
        if self.op not in (op, "any"):
            return False
        if op != "flush" and self.length:
            return offset < self.offset + self.length and self.offset < offset + length
        return op == "flush" or offset + length > self.offset


class FaultStore:
    """Wraps a store; every call passes through unless a rule fires."""

    def __init__(self, inner: BlockStore) -> None:
        self.inner = inner
        self.rules: list[FaultRule] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    @property
    def size(self) -> int:
        return self.inner.size

    def add(self, rule: FaultRule) -> None:
        if rule.op not in OPS or rule.effect not in EFFECTS:
            raise ValueError(f"op must be one of {OPS} and effect one of {EFFECTS}")
        with self._lock:
            self.rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _fire(self, op: str, offset: int, length: int) -> FaultRule | None:
        with self._lock:
            for rule in self.rules:
                if not rule.matches(op, offset, length):
                    continue
                rule.seen += 1
                if rule.seen <= rule.after or (rule.times and rule.fired >= rule.times):
                    continue
                rule.fired += 1
                return rule
        return None

    def _check(self, op: str, offset: int, length: int) -> FaultRule | None:
        rule = self._fire(op, offset, length)
        if rule is None:
            return None
        if rule.effect == "delay":
            time.sleep(rule.delay)
            return None
        if rule.effect == "eio":
            raise StoreError(Errno.EIO, f"{op} at {offset}: injected I/O error")
        if rule.effect == "enospc":
            raise StoreError(Errno.ENOSPC, f"{op} at {offset}: injected no space")
        return rule  # short: the caller does half and fails

    def read_into(self, buf: memoryview, offset: int) -> None:
        if self._check("read", offset, len(buf)):
            raise StoreError(Errno.EIO, f"read at {offset}: injected short read")
        self.inner.read_into(buf, offset)

    def write(self, data: memoryview | bytes, offset: int, fua: bool = False) -> None:
        if self._check("write", offset, len(data)):
            half = len(data) // 2
            self.inner.write(memoryview(data)[:half], offset)
            raise StoreError(Errno.EIO, f"write at {offset}: injected short write")
        self.inner.write(data, offset, fua)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        if self._check("zero", offset, length):
            raise StoreError(Errno.EIO, f"zero at {offset}: injected short write")
        self.inner.zero(offset, length, may_trim, fast, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self._check("trim", offset, length):
            raise StoreError(Errno.EIO, f"trim at {offset}: injected short write")
        self.inner.trim(offset, length, fua)

    def flush(self) -> None:
        if self._check("flush", 0, 0):
            raise StoreError(Errno.EIO, "flush: injected error")
        self.inner.flush()

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def release(self) -> None:
        self.inner.release()

    def extents(self, offset: int, length: int, limit: int | None = None) -> list[Extent]:
        return self.inner.extents(offset, length, limit)

    def resize(self, size: int) -> None:
        self.inner.resize(size)

    def close(self) -> None:
        self.inner.close()
