"""Run the whole service (`python -m launcher`) as a child process on free ports: for tests and benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from launcher.serve import REPO_ROOT, free_port, stop_process


@dataclass
class Stack:
    process: subprocess.Popen
    model_dir: Path
    openai_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def openai_base_url(self) -> str:
        return f"http://127.0.0.1:{self.openai_port}/v1"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_stack(model_dir: Path, work_dir: Path, timeout_s: float = 300.0, repo_root: Path = REPO_ROOT,
                **extra_env: str) -> Stack:
    """The service from the checkout at `repo_root` (another one's code, for benchmarks that compare two)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    openai_port = free_port()
    grpc_port = free_port(frozenset({openai_port}))
    metrics_port = free_port(frozenset({openai_port, grpc_port}))
    env = dict(os.environ)
    env.update(
        MODEL_DIR=str(model_dir),
        NIM_CACHE_PATH=str(work_dir),
        NIM_SERVER_PORT=str(openai_port),
        TRITON_GRPC_PORT=str(grpc_port),
        TRITON_METRICS_PORT=str(metrics_port),
        **extra_env,
    )
    log_path = work_dir / "stack.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, "-m", "launcher"], cwd=repo_root, env=env, stdout=log_file, stderr=subprocess.STDOUT
    )
    log_file.close()  # the child holds its own copy
    stack = Stack(process, model_dir, openai_port, grpc_port, metrics_port, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the stack exited with {process.returncode}:\n{stack.log_text()[-5000:]}")
        try:
            with urllib.request.urlopen(f"{stack.openai_base_url}/health/ready", timeout=2) as reply:
                if reply.status == 200:
                    return stack
        except OSError:
            pass
        time.sleep(0.5)
    stop_stack(stack)
    raise RuntimeError(f"the stack was not ready after {timeout_s} s:\n{stack.log_text()[-5000:]}")


def stop_stack(stack: Stack) -> None:
    stop_process(stack.process, timeout_s=30)
