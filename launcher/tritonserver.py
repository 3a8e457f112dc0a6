"""Find a real Triton Inference Server and the environment it needs to run our Python models.

Two places are supported: NVIDIA's Triton container (``/opt/tritonserver``) and the server that the
``nvidia-pytriton`` wheel carries. The wheel's Python backend ships one stub per Python version; we copy the
stub for the running interpreter into a private copy of the backend folder, as the wheel itself does.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

CONTAINER_ROOT = Path("/opt/tritonserver")


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path
    library_dirs: tuple[Path, ...]

    def environment(self, python_path: list[str]) -> dict[str, str]:
        """The environment tritonserver and its Python-backend stubs must run with."""
        env = dict(os.environ)
        # The running interpreter's libpython must win over any other patch level on the system,
        # or standard-library extension modules fail to import inside the stub.
        libdirs = [str(p) for p in self.library_dirs]
        if env.get("LD_LIBRARY_PATH"):
            libdirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs)
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
        site_packages = sysconfig.get_paths()["purelib"]
        env["PYTHONPATH"] = os.pathsep.join([*python_path, site_packages])
        return env


def find_triton(work_dir: Path) -> TritonInstall:
    """Locate tritonserver: NVIDIA's container first, then the nvidia-pytriton wheel."""
    container_binary = CONTAINER_ROOT / "bin" / "tritonserver"
    if container_binary.exists():
        return TritonInstall(container_binary, CONTAINER_ROOT / "backends", (Path(sysconfig.get_config_var("LIBDIR")),))
    return _from_pytriton_wheel(work_dir)


def _from_pytriton_wheel(work_dir: Path) -> TritonInstall:
    try:
        import pytriton  # noqa: PLC0415 - optional dependency, only needed off the container
    except ImportError as exc:  # pragma: no cover - install problem
        raise RuntimeError("tritonserver not found: install nvidia-pytriton or run in NVIDIA's Triton container") from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    backend_dir = work_dir / "backends"
    python_backend = backend_dir / "python"
    if not (python_backend / "triton_python_backend_stub").exists():
        shutil.rmtree(python_backend, ignore_errors=True)
        shutil.copytree(root / "backends" / "python", python_backend)
        shutil.copy2(stub, python_backend / "triton_python_backend_stub")
    return TritonInstall(
        binary=root / "bin" / "tritonserver",
        backend_dir=backend_dir,
        library_dirs=(Path(sysconfig.get_config_var("LIBDIR")), libs),
    )
