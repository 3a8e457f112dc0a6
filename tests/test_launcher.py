"""The launcher runs tritonserver and the adapter as one service, and leaves nothing behind."""

from __future__ import annotations

import gc
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

import httpx
import pytest

from launcher.cpu_cores import parse_cpu_list
from launcher.serve import descendants
from launcher.stack_process import start_stack, stop_stack
from launcher.startup_heap import freeze_startup_heap


def alive(pids: set[int]) -> set[int]:
    result = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            result.add(pid)
    return result


def ready_status(stack) -> int:
    try:
        with urllib.request.urlopen(f"{stack.openai_base_url}/health/ready", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def assert_full_engine_answers_429(stack) -> None:
    """One engine slot and no queue: a second request while the first runs is refused, not queued forever."""
    body = {"model": stack.model_name, "prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True}

    def occupy(started: threading.Event):
        with httpx.stream("POST", f"{stack.openai_base_url}/completions", json=body, timeout=60) as reply:
            for _ in reply.iter_lines():
                started.set()

    for _ in range(5):  # the tiny model finishes in about a second: retry if the slot was already free again
        started = threading.Event()
        runner = threading.Thread(target=occupy, args=(started,))
        runner.start()
        assert started.wait(30)
        refused = httpx.post(f"{stack.openai_base_url}/completions", json=dict(body, stream=False), timeout=60)
        runner.join()
        if refused.status_code != 200:
            break
    assert refused.status_code == 429, refused.text
    assert refused.headers.get("retry-after")
    assert refused.json()["error"]["message"]


def test_triton_death_means_not_ready_and_sigterm_leaves_no_process(tiny_gemma_dir, tmp_path):
    stack = start_stack(tiny_gemma_dir, tmp_path, ENGINE_MAX_BATCH_SIZE="1", ENGINE_MAX_QUEUE_SIZE="0",
                        NIM_MAX_MODEL_LEN="256")
    try:
        assert_full_engine_answers_429(stack)
        family = descendants(stack.process.pid)
        servers = [p for p in family if Path(f"/proc/{p}/comm").read_text().strip() == "tritonserver"]
        stubs = [p for p in family if "triton_python_backend_stub" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(servers) == 1 and len(stubs) == 3, "expected one tritonserver with three Python models"
        assert ready_status(stack) == 200

        os.kill(servers[0], signal.SIGKILL)
        assert wait_until(lambda: ready_status(stack) == 503, timeout=10)
        assert wait_until(lambda: not alive(set(stubs)), timeout=15), "Python backend stubs outlived tritonserver"
        assert stack.process.poll() is None, "the adapter should stay up and report not-ready"
    finally:
        stop_stack(stack)
    assert stack.process.returncode == 0
    assert not alive(family), "processes left behind after SIGTERM"


def test_stopping_with_a_generation_in_flight_cancels_it_instead_of_waiting_for_it(default_model_dir, tmp_path):
    """The adapter goes first and stops its requests in the engine; otherwise Triton waits for them (30 s)."""
    stack = start_stack(default_model_dir, tmp_path, NIM_MAX_MODEL_LEN="2048")
    body = {"model": stack.model_name, "prompt": "Hello", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    started = threading.Event()

    def stream():
        try:
            with httpx.stream("POST", f"{stack.openai_base_url}/completions", json=body, timeout=120) as reply:
                for _ in reply.iter_lines():
                    started.set()
        except httpx.HTTPError:
            pass  # the server closes the stream as it stops

    client = threading.Thread(target=stream)
    client.start()
    assert started.wait(60)
    began = time.monotonic()
    stop_stack(stack)  # SIGTERM to the launcher
    client.join(30)
    assert stack.process.returncode == 0
    assert time.monotonic() - began < 15, stack.log_text()[-3000:]


def test_cpu_lists_parse_as_the_kernel_writes_them():
    assert parse_cpu_list("0-3,6") == {0, 1, 2, 3, 6}
    assert parse_cpu_list(" 1 ") == {1}
    for malformed in ("", "3-1", "0-", "a", "0,", "-1", "0-99999999999"):
        with pytest.raises(ValueError, match="not a CPU list"):
            parse_cpu_list(malformed)


def thread_cores(pid: int) -> dict[int, frozenset[int]]:
    cores = {}
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            cores[int(thread)] = frozenset(os.sched_getaffinity(int(thread)))
        except OSError:
            continue  # ended meanwhile
    return cores


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a core for the engine and one for the rest")
def test_engine_cpu_cores_keep_every_other_thread_of_the_service_off_the_engines_cores(tiny_gemma_dir, tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    engine_cores, rest = frozenset(allowed[:1]), frozenset(allowed[1:])
    stack = start_stack(tiny_gemma_dir, tmp_path, NIM_MAX_MODEL_LEN="256", ENGINE_CPU_CORES=str(allowed[0]))
    try:
        body = {"model": stack.model_name, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
        reply = httpx.post(f"{stack.openai_base_url}/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
        engine_threads, other_threads = [], []
        for pid in descendants(stack.process.pid):
            threads = thread_cores(pid)
            if "tensorrt_llm" in Path(f"/proc/{pid}/cmdline").read_text():
                engine_threads += [t for t, cores in threads.items() if cores == engine_cores]
                threads = {t: cores for t, cores in threads.items() if cores != engine_cores}
            other_threads += threads.items()
        assert engine_threads, "the engine's decode thread is not on its core"
        assert len(other_threads) > 10  # tritonserver's, the three stubs', the adapter's
        assert {cores for _, cores in other_threads} == {rest}
    finally:
        stop_stack(stack)


def test_engine_cpu_cores_outside_this_machine_stop_the_launcher_with_a_clear_error(tiny_gemma_dir, tmp_path):
    with pytest.raises(RuntimeError, match="ENGINE_CPU_CORES=4096: this process may use only cores"):
        start_stack(tiny_gemma_dir, tmp_path, ENGINE_CPU_CORES="4096")


def test_the_startup_heap_leaves_full_collections_while_later_garbage_is_still_collected():
    class Node:
        pass

    startup = [Node() for _ in range(1000)]
    try:
        frozen = freeze_startup_heap()
        assert frozen >= len(startup)
        tracked = {id(o) for o in gc.get_objects(generation=2)}
        assert not any(id(node) in tracked for node in startup)  # a full collection no longer walks them
        later = Node()
        later.cycle = later  # reachable only from itself: only the collector can free it
        freed = weakref.ref(later)
        del later
        gc.collect()
        assert freed() is None
    finally:
        gc.unfreeze()  # the rest of the suite's objects go back to the collector


def test_the_adapter_freezes_its_startup_heap_before_serving(tiny_stack):
    assert re.search(r"\d+ startup objects frozen", tiny_stack.log_text())
