"""The engine's C kernels (`csrc/*.c`): compiled at first use with the system's C compiler (about a second
each), cached by the hash of source and command, loaded with ctypes.

They use AVX2 and FMA and link torch's own OpenMP runtime, so they share ATen's thread pool and thread count.
Without a compiler or those instructions `function()` returns None and the engine keeps its ATen paths.
"""

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = Path(__file__).parent / "csrc"
_REPO_CACHE = Path(__file__).resolve().parent.parent / ".cache"


def cpu_supported() -> bool:
    """Whether this CPU runs the kernels (AVX2 and FMA)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _cache_dirs() -> list[Path]:
    dirs = [Path(os.environ["NIM_CACHE_PATH"]) / "native"] if os.environ.get("NIM_CACHE_PATH") else []
    # Last, a folder of this user's own under the shared temporary folder (checked before use: see _private).
    return dirs + [_REPO_CACHE / "native", Path(tempfile.gettempdir()) / f"nim-native-{os.getuid()}"]


def _private(folder: Path) -> bool:
    """Whether `folder` is this user's and nobody else can write to it: no one may plant a library there."""
    if folder.parent == Path(tempfile.gettempdir()):
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.stat()
        return info.st_uid == os.getuid() and not info.st_mode & 0o022
    return True


def _compile(command: list[str], path: Path) -> None:
    """Compile into a unique temporary file beside `path`, then rename it into place: atomic, so concurrent
    engines (other processes, other containers sharing the cache) never load a half-written library."""
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        subprocess.run([*command, "-o", partial], check=True, capture_output=True, timeout=120)
        os.chmod(partial, 0o755)  # mkstemp's 0600 would keep other users of a shared cache from loading it
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("compiled %s", path)


def _openmp_flags() -> list[str]:
    """Link against torch's own OpenMP runtime: one thread pool (and one thread count) for ATen and the kernels."""
    torch_lib = Path(torch.__file__).parent / "lib"
    if (torch_lib / "libgomp.so.1").exists():
        return ["-L", str(torch_lib), "-l:libgomp.so.1", f"-Wl,-rpath,{torch_lib}"]
    log.warning("torch's libgomp not found: native kernels get the system's OpenMP and a thread pool of their own")
    return []


@functools.cache
def _library(name: str, linked: tuple[str, ...] = (), mode: int = ctypes.DEFAULT_MODE) -> ctypes.CDLL | None:
    """`csrc/<name>.c`, with the kernels `linked` that it calls, compiled and loaded, or None where it cannot be
    (logged)."""
    if not cpu_supported():
        return None
    if name != "chunk_pool" and chunk_pool() is None:
        return None
    sources = [_SOURCES / f"{n}.c" for n in (name, *linked)]
    command = ["cc", "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", *map(str, sources), "-lm",
               *_openmp_flags()]
    headers = b"".join(h.read_bytes() for h in sorted(_SOURCES.glob("*.h")))  # what the sources may include
    code = b"".join(source.read_bytes() for source in sources)
    digest = hashlib.sha256(code + headers + " ".join(command).encode()).hexdigest()[:16]
    for folder in _cache_dirs():
        path = folder / f"{name}-{digest}.so"
        try:
            if not _private(folder):
                log.warning("native kernels: %s is not private to this user; not used", folder)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                _compile(command, path)
            try:
                return ctypes.CDLL(str(path), mode=mode)
            except OSError:  # a broken file (a crash mid-copy, a foreign build): build it again
                path.unlink(missing_ok=True)
                _compile(command, path)
                return ctypes.CDLL(str(path), mode=mode)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            log.warning("%s kernel unavailable in %s: %s %s", name, folder, e, detail.decode(errors="replace")[-500:])
    return None


@functools.cache
def chunk_pool() -> ctypes.CDLL | None:
    """csrc/chunk_pool.c, loaded before any kernel with its symbols global: the kernels that call `chunk_loop`
    bind to this one copy, so a thread has one pool whichever kernels it runs."""
    library = _library("chunk_pool", (), ctypes.RTLD_GLOBAL)
    if library is not None:
        library.chunk_pool_start.restype, library.chunk_pool_start.argtypes = ctypes.c_int, [ctypes.c_int] * 2
        library.openmp_workers_start.restype, library.openmp_workers_start.argtypes = None, [ctypes.c_int]
    return library


def function(name: str, restype, argtypes: list, linked: tuple[str, ...] = ()) -> ctypes._CFuncPtr | None:
    """The C function `name` of `csrc/<name>.c` (linked with the kernels `linked`), typed, or None where the
    kernel cannot be built."""
    library = _library(name, linked)
    if library is None:
        return None
    kernel = getattr(library, name)
    kernel.restype, kernel.argtypes = restype, argtypes
    return kernel
