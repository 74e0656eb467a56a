"""Stop conditions on generated text and tokens, shared by every decoder."""

from __future__ import annotations


class StopChecker:
    """Watches a growing text for stop strings.

    ``update(text)`` returns (stopped, n_visible): how many characters of ``text`` may be shown
    now. While streaming, text that could still become a stop string is held back.
    """

    def __init__(self, stop: list[str], include_stop: bool = False):
        self.stop = stop
        self.include = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1

    def update(self, text: str, search_from: int = 0) -> tuple[bool, int]:
        if not self.stop:
            return False, len(text)
        start = max(0, search_from - self.hold)
        hits = [(text.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            return True, i + len(s) if self.include else i
        return False, len(text) - self._partial(text)

    def _partial(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        for k in range(min(self.hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
