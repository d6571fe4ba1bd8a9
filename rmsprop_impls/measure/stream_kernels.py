"""The roof's C kernels: the steps' own memory patterns at native speed, with and without non-temporal stores.

No numpy or MLX kernel reads three streams and writes two in one pass, nor streams
its stores past the caches, as ``cpu_kernel`` does above 8 MiB; without them the
roof beyond the caches sat a few per cent under what that kernel reached.
``stream_kernels.c`` is built on first use with the C compiler (``$CC``, else
``cc``) into the per-user cache, keyed by a hash of the source and the compiler,
and loaded with ctypes, whose calls release the GIL, so that the roof's threads
run them in parallel. Where it cannot be built, the roof goes without them and
:func:`load` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..user_cache import cache_dir

SOURCE = Path(__file__).with_name("stream_kernels.c")
#: Each kernel and the float32 arrays it takes: (w, g, v, n) or (w, g, m, v, n), their addresses, then their length.
KERNELS = {"step_pattern": 3, "step_pattern_streaming": 3, "two_state_pattern": 4}


def compiler() -> str | None:
    """``$CC``, else the ``cc`` on ``PATH``; ``None`` where there is none."""
    return os.environ.get("CC") or shutil.which("cc")


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str | None]:
    """The built kernels and ``None``, or ``None`` and why they cannot be built here (once per process)."""
    cc = compiler()
    if cc is None:
        return None, "no C compiler (set CC or install cc)"
    key = hashlib.sha256(SOURCE.read_bytes() + cc.encode()).hexdigest()[:16]
    library = cache_dir() / "roof" / f"stream_kernels-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        command = [cc, "-O3", "-std=c99", "-shared", "-fPIC", str(SOURCE), "-o", str(partial)]
        try:
            subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            return None, f"{' '.join(command)} failed: {detail.strip().splitlines()[-1] if detail.strip() else e}"
        os.replace(partial, library)  # atomic: a process that starts at once loads one whole build or builds its own
    lib = ctypes.CDLL(str(library))
    for name, arrays in KERNELS.items():
        getattr(lib, name).argtypes = [ctypes.c_void_p] * arrays + [ctypes.c_size_t]
        getattr(lib, name).restype = None
    lib.streaming_stores.restype = ctypes.c_int
    return lib, None
