"""The routing keys of the blocks a prefix cache holds (services/common/block_hash.py's
routing_key), and their changes in order.

Each frontend's load stream sends the changes since its previous report rather than the
whole set: the set grows with the cache to hundreds of thousands of keys, and rebuilding,
sorting and sending it twenty times a second per frontend took the scheduler's event loop
from planning steps, more so the longer a server ran."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyCursor:
    """Where a reader stands: the changes it has seen, in the journal that made it."""

    journal: CachedKeys
    position: int


class CachedKeys:
    def __init__(self, min_kept_changes: int = 4096) -> None:
        # Several hashes may share a key (its low 64 bits): a key stays while any does.
        self._counts: dict[int, int] = {}
        # (key, present after the change), oldest first; _changes[0] is change number _base.
        self._changes: list[tuple[int, bool]] = []
        self._base = 0
        self._min_kept_changes = min_kept_changes

    def __len__(self) -> int:
        return len(self._counts)

    def add(self, key: int) -> None:
        count = self._counts.get(key, 0)
        self._counts[key] = count + 1
        if count == 0:
            self._record(key, True)

    def remove(self, key: int) -> None:
        count = self._counts[key]
        if count > 1:
            self._counts[key] = count - 1
        else:
            del self._counts[key]
            self._record(key, False)

    def clear(self) -> None:
        """Forgets every key; every reader then gets the whole (empty) set again."""
        self._counts.clear()
        self._base += len(self._changes) + 1
        self._changes.clear()

    def snapshot(self) -> tuple[list[int], KeyCursor]:
        """Every key, in no order, and the cursor that follows them."""
        return list(self._counts), self._cursor()

    def changes_since(self, cursor: KeyCursor) -> tuple[list[int], list[int], KeyCursor] | None:
        """(keys added, keys removed, the cursor after them) since `cursor`; None when the
        cursor is of another journal or its changes are no longer kept: the reader then
        takes a snapshot. A key that came and went in between is reported removed, which a
        reader that never had it ignores."""
        if cursor.journal is not self or cursor.position < self._base:
            return None
        present: dict[int, bool] = {}
        for key, is_present in self._changes[cursor.position - self._base :]:
            present[key] = is_present
        added = [key for key, is_present in present.items() if is_present]
        removed = [key for key, is_present in present.items() if not is_present]
        return added, removed, self._cursor()

    def _cursor(self) -> KeyCursor:
        return KeyCursor(self, self._base + len(self._changes))

    def _record(self, key: int, present: bool) -> None:
        self._changes.append((key, present))
        # Kept: at least as many changes as keys, so that a reader a whole cache's turnover
        # behind still gets changes; one further behind gets a snapshot.
        limit = max(self._min_kept_changes, 2 * len(self._counts))
        if len(self._changes) > 2 * limit:
            dropped = len(self._changes) - limit
            del self._changes[:dropped]
            self._base += dropped
