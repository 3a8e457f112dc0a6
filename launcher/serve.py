"""Start Triton on a rendered model repository, wait for the ensemble, then start the OpenAI adapter.

SIGINT/SIGTERM stops both, the adapter first: it cancels its in-flight requests in the engine while Triton still
takes requests (Triton stops taking them, stop requests included, once it is told to exit, and would then wait
for every running generation). The children run in their own process group, so a terminal's Ctrl-C reaches
only this process, which keeps that order. They also get SIGTERM if this process dies (PR_SET_PDEATHSIG), so
nothing is left orphaned. If Triton dies, the adapter stays up and reports not-ready on /v1/health/ready.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from build.repository import RepositorySettings, render_repository
from launcher.cpu_cores import confine, split_cores
from launcher.tritonserver import find_triton

REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("launcher")


class LaunchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    model_dir: Path | None = None  # MODEL_DIR: a Hugging Face checkpoint; default: the embedded Gemma 3 270M
    nim_cache_path: Path = REPO_ROOT / ".cache"
    nim_server_port: int = 8000
    nim_max_model_len: int = 4096
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_http_port: int = 0  # 0: any free port (8000 belongs to the adapter)
    engine_max_batch_size: int = 16
    engine_max_queue_size: int = 64
    engine_dtype: str = "float32"
    engine_num_threads: int = 0
    engine_cpu_cores: str = ""  # the engine's own cores, e.g. "0-5"; the rest of the service gets the others
    engine_stream_interval: int = 0  # 0: auto (engine.engine.AUTO_STREAMS_PER_STEP)
    nim_enable_kv_cache_reuse: bool = True  # prompts skip the prefill of what a cache slot holds (prefix_cache.py)
    engine_kind: str = "cpu"  # "synthetic" only for benchmarking the serving stack
    triton_ready_timeout_s: float = 600.0


def free_port(taken: frozenset[int] = frozenset()) -> int:
    """A port free now and not among `taken` (ports chosen but not yet bound, which the kernel may hand out again)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM to it if the launcher dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(argv: list[str], env: dict[str, str], cores: frozenset[int] | None = None) -> subprocess.Popen:
    def before_exec():
        _die_with_parent()
        if cores:
            os.sched_setaffinity(0, cores)

    return subprocess.Popen(argv, env=env, preexec_fn=before_exec, process_group=0)


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} was not ready after {timeout_s:.0f} s")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, theirs, ...), from /proc's parent ids."""
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


TRITON_EXIT_TIMEOUT_S = 5


def stop_process(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stop the processes one at a time, the last started first."""
    for process in reversed(processes):
        stop_process(process)


def main() -> None:
    from adapter.logging_setup import configure_logging  # one logging set-up for the whole product

    configure_logging()
    settings = LaunchSettings()
    model_dir = settings.model_dir
    if model_dir is None:
        from build.default_model import ensure_default_model

        model_dir = ensure_default_model()
    model_dir = model_dir.resolve()

    engine_cores = other_cores = None
    if settings.engine_cpu_cores:
        try:
            engine_cores, other_cores = split_cores(settings.engine_cpu_cores)
        except ValueError as exc:
            log.error("%s", exc)
            sys.exit(1)
        log.info("the engine computes on cores %s, the rest of the service on %s", sorted(engine_cores),
                 sorted(other_cores))

    work_dir = settings.nim_cache_path / "run"
    triton = find_triton(work_dir)
    repository = render_repository(
        RepositorySettings(
            target="cpu",
            model_dir=model_dir,
            max_seq_len=settings.nim_max_model_len,
            max_batch_size=settings.engine_max_batch_size,
            max_queue_size=settings.engine_max_queue_size,
            dtype=settings.engine_dtype,
            num_threads=settings.engine_num_threads,
            cpu_cores=settings.engine_cpu_cores,
            stream_interval=settings.engine_stream_interval,
            kv_cache_reuse=settings.nim_enable_kv_cache_reuse,
            engine_kind=settings.engine_kind,
        ),
        work_dir / "model_repository",
    )
    http_port = settings.triton_http_port or free_port(
        frozenset({settings.nim_server_port, settings.triton_grpc_port, settings.triton_metrics_port}))
    triton_env = triton.environment(python_path=[str(REPO_ROOT)])
    processes: list[subprocess.Popen] = []

    def on_signal(signum, _frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        _stop(processes)
        sys.exit(0)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    log.info("starting tritonserver (gRPC %d, metrics %d, HTTP %d)", settings.triton_grpc_port,
             settings.triton_metrics_port, http_port)
    server = _start(
        [
            str(triton.binary),
            f"--model-repository={repository}",
            f"--backend-directory={triton.backend_dir}",
            f"--grpc-port={settings.triton_grpc_port}",
            f"--metrics-port={settings.triton_metrics_port}",
            f"--http-port={http_port}",
            "--log-verbose=0",
            "--exit-on-error=true",
            # The adapter has stopped its generations before Triton is told to exit; what remains can only be a
            # direct gRPC client's stream, or Triton 2.51 holding an ensemble that it sometimes never unloads
            # after a stopped request. Its default, 30 s, would outlast the launcher's own 20 s wait.
            f"--exit-timeout-secs={TRITON_EXIT_TIMEOUT_S}",
        ],
        triton_env,
    )
    processes.append(server)
    try:
        _wait_ready(f"http://127.0.0.1:{http_port}/v2/models/ensemble/ready", server,
                    settings.triton_ready_timeout_s, "tritonserver")
    except RuntimeError as exc:
        log.error("%s", exc)
        _stop(processes)
        sys.exit(1)
    if engine_cores:
        # Everything started with all the cores (see launcher/cpu_cores.py); the engine thread is on its own now.
        confine({server.pid, *descendants(server.pid)}, engine_cores, other_cores)
    log.info("ensemble ready; starting the OpenAI adapter on port %d", settings.nim_server_port)

    adapter_env = dict(os.environ)
    adapter_env.update(
        MODEL_DIR=str(model_dir),
        TRITON_GRPC_URL=f"127.0.0.1:{settings.triton_grpc_port}",
        TRITON_METRICS_URL=f"http://127.0.0.1:{settings.triton_metrics_port}/metrics",
        NIM_SERVER_PORT=str(settings.nim_server_port),
        NIM_MAX_MODEL_LEN=str(settings.nim_max_model_len),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    adapter = _start([sys.executable, "-m", "adapter"], adapter_env, other_cores)
    processes.append(adapter)

    reported_triton_exit = False
    while adapter.poll() is None:
        if server.poll() is not None and not reported_triton_exit:
            log.error("tritonserver exited with status %d; the adapter now reports not-ready", server.returncode)
            reported_triton_exit = True
        time.sleep(1)
    log.error("the adapter exited with status %d; stopping", adapter.returncode)
    _stop(processes)
    sys.exit(adapter.returncode or 1)
