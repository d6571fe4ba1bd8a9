"""Imported first: says what to install when MLX has no back-end, instead of ``libmlx.so: cannot open``.

On Linux the ``mlx`` wheel holds only the Python bindings; ``libmlx.so`` comes with one back-end
package (``mlx-cpu``, ``mlx-cuda-12`` or ``mlx-cuda-13``, MLX's ``[cpu]``, ``[cuda12]`` and
``[cuda13]`` extras). This package depends on ``mlx`` alone, as mlx-lm does, so that installing it
never replaces the back-end a user has (every back-end ships the same ``mlx/lib/libmlx.so``, and
pip does not see the clash); its own extras of the same names install one. Run as the command line,
the message is one line on stderr and exit status 1, not a traceback.
"""

from __future__ import annotations

import os
import sys

NO_BACKEND = (
    "MLX is installed without a back-end (no libmlx.so): install one with "
    "pip install -e '.[cpu]' (or 'rmsprop-bench[cpu]'), or [cuda12] / [cuda13] on an NVIDIA machine"
)


def _check() -> None:
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        if "libmlx" not in str(e):
            raise
        if os.path.basename(sys.argv[0]) == "rmsprop-bench":
            print(f"rmsprop-bench: {NO_BACKEND}", file=sys.stderr)
            raise SystemExit(1) from None
        raise ImportError(NO_BACKEND) from None


_check()
