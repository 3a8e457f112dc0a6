"""The launcher runs tritonserver and the adapter as one service, and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from launcher.stack_process import start_stack, stop_stack


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


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


def test_triton_death_means_not_ready_and_sigterm_leaves_no_process(tiny_gemma_dir, tmp_path):
    stack = start_stack(tiny_gemma_dir, tmp_path)
    try:
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
