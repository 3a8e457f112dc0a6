"""Stop strings on streamed text: trim the output at the first stop string, even one split across chunks."""

from __future__ import annotations


class StopStringMatcher:
    """Feeds text chunks; holds back text that could still become a stop string.

    The stop that wins is the first one to complete (smallest end; at equal ends the earlier start). That is the
    one a token-by-token generator would have been stopped by, and it does not depend on how text was chunked.
    """

    def __init__(self, stops: list[str], include_stop: bool = False):
        self._stops = [s for s in dict.fromkeys(stops) if s]  # empty stops would match everywhere
        self._include_stop = include_stop
        self._held = ""
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, str | None]:
        """Returns the text safe to emit now and the matched stop string (reported again on every later call)."""
        if self.matched is not None:
            return "", self.matched
        buffer = self._held + text
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is not None:
            end, start, self.matched = best
            self._held = ""
            return buffer[: end if self._include_stop else start], self.matched
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        """Releases held-back text at the end of generation (nothing once a stop matched)."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _partial_stop_length(self, buffer: str) -> int:
        # Length of the longest tail of buffer that begins some stop string (a whole stop would have matched).
        longest = max((len(s) for s in self._stops), default=0)
        for length in range(min(len(buffer), longest - 1), 0, -1):
            tail = buffer[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
