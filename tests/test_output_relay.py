"""The engine shell's output relay: coalescing while sending lags, order, isolation of broken streams."""

from __future__ import annotations

import threading
import time

from engine import GenerationOutput
from pipeline.output_relay import OutputRelay


def step(request_id: str, token: int, finished: bool = False) -> GenerationOutput:
    return GenerationOutput(request_id, [token], finished=finished, finish_reason="length" if finished else None,
                            num_output_tokens=token + 1)


class Recorder:
    def __init__(self, delay: float = 0.0):
        self.sent: dict[str, list[GenerationOutput]] = {}
        self.delay = delay
        self.done = threading.Event()

    def send(self, target: str, output: GenerationOutput) -> None:
        time.sleep(self.delay)
        self.sent.setdefault(target, []).append(output)
        if output.finished and target == "last":
            self.done.set()


def tokens(outputs: list[GenerationOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def test_a_relay_that_keeps_up_sends_every_step():
    recorder = Recorder()
    relay = OutputRelay(recorder.send)
    for t in range(5):
        relay.put("last", step("a", t, finished=t == 4))
        time.sleep(0.02)
    assert recorder.done.wait(5)
    relay.close()
    assert [o.token_ids for o in recorder.sent["last"]] == [[0], [1], [2], [3], [4]]


def test_a_lagging_relay_coalesces_without_losing_or_reordering_tokens():
    recorder = Recorder(delay=0.05)
    relay = OutputRelay(recorder.send)
    for t in range(50):  # all queued while the first send is still sleeping
        relay.put("other", step("b", t, finished=t == 49))
        relay.put("last", step("a", t, finished=t == 49))
    assert recorder.done.wait(10)
    relay.close()
    for target in ("other", "last"):
        sent = recorder.sent[target]
        assert tokens(sent) == list(range(50))
        assert len(sent) < 10
        assert sent[-1].finished and sent[-1].num_output_tokens == 50
        assert not any(o.finished for o in sent[:-1])


def test_a_failing_send_does_not_stop_other_requests():
    recorder = Recorder()

    def send(target, output):
        if target == "broken":
            raise RuntimeError("stream gone")
        recorder.send(target, output)

    relay = OutputRelay(send)
    relay.put("broken", step("x", 0))
    relay.put("last", step("a", 0, finished=True))
    assert recorder.done.wait(5)
    relay.close()
