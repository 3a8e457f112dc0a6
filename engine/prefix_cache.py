"""Which tokens each KV cache slot holds, so that a prompt can skip the prefill of what a slot already has.

A slot's keys and values stay in place after its request ends, until something overwrites them. A new prompt
that starts with the tokens a free slot holds (a chat's next turn, a shared system prompt, the same document
asked again) has only its remainder prefilled. This is TensorRT-LLM's KV cache reuse and vLLM's prefix caching
for a cache of static slots: no extra memory, and nothing to evict but what the slots overwrite.
"""

from __future__ import annotations


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # a chat's next turn: one comparison in C
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotPrefixes:
    def __init__(self, slots: int):
        # tokens[s][p] is the token whose keys and values are at position p of slot s
        self._tokens: list[list[int]] = [[] for _ in range(slots)]

    def held(self, slot: int) -> int:
        return len(self._tokens[slot])

    def reusable(self, slot: int, prompt: list[int]) -> int:
        """Positions of `prompt` whose keys and values `slot` already holds. The last prompt token is always
        recomputed: its hidden state gives the first token."""
        return min(common_prefix(self._tokens[slot], prompt), len(prompt) - 1)

    def best(self, slots: list[int], prompt: list[int]) -> tuple[int, int]:
        """The slot of `slots` holding the longest part of `prompt`, and that length (the first slot on ties)."""
        best_slot, best_length = -1, 0
        for slot in slots:
            length = self.reusable(slot, prompt)
            if best_slot < 0 or length > best_length:
                best_slot, best_length = slot, length
        return best_slot, best_length

    def copy(self, source: int, target: int, length: int) -> None:
        self._tokens[target] = self._tokens[source][:length]

    def hold(self, slot: int, tokens: list[int]) -> None:
        self._tokens[slot] = list(tokens)

    def append(self, slot: int, token: int) -> None:
        self._tokens[slot].append(token)

    def truncate(self, slot: int, length: int) -> None:
        del self._tokens[slot][length:]

    def forget(self, slot: int) -> None:
        self._tokens[slot] = []
