"""Block stores: one small interface, with file and (later) mirror, fault and remote layers."""

from mirrorpool.store.base import BlockStore, Extent, FastZeroUnsupported, StoreError
from mirrorpool.store.file import FileStore

__all__ = ["BlockStore", "Extent", "FastZeroUnsupported", "FileStore", "StoreError"]
