"""What preprocessing tells postprocessing about a request, carried through the engine as one string.

Triton does not let a step that follows a decoupled model read tensors of another origin, so the engine
echoes this JSON on every response (the `request_context` tensor in docs/tensors.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class RequestContext:
    key: str  # the client's request id, or one made up by preprocessing; also used to cancel the engine
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def to_json(self) -> str:
        # vars(), not dataclasses.asdict: the fields are flat, and asdict's deep copy cost ~25 us of every request
        return json.dumps(vars(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "RequestContext":
        return cls(**json.loads(text))
