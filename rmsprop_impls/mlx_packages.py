"""Which MLX back-end package's ``libmlx.so`` is installed, read from the files alone (no ``import mlx``).

On Linux each back-end package (``mlx-cpu``, ``mlx-cuda-12``, ``mlx-cuda-13``) ships the same file,
``mlx/lib/libmlx.so``; with two installed, the one pip wrote last wins, and pip says nothing. The
sha256 each package's RECORD holds for that file tells which one it is. This module imports no MLX, so
it answers where ``mlx.core`` cannot load.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata

#: MLX's back-end packages on Linux; each ships ``mlx/lib/libmlx.so``.
BACKEND_PACKAGES = ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13")


def libmlx_backends() -> tuple[list[str], str | None]:
    """The MLX back-end packages installed here, and the one whose ``libmlx.so`` is the file on disk (by the
    sha256 in its RECORD): with two installed, the one pip wrote last won, and pip says nothing."""
    installed, owner = [], None
    for name in BACKEND_PACKAGES:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        installed.append(name)
        for entry in dist.files or []:
            if entry.as_posix().endswith("mlx/lib/libmlx.so") and entry.hash is not None:
                try:
                    digest = hashlib.new(entry.hash.mode, entry.locate().read_bytes()).digest()
                except OSError:
                    continue
                if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == entry.hash.value:
                    owner = name
    return installed, owner
