"""What MLX says about its devices, asked the same way on every supported release (0.30.1 to 0.32.x).

``mx.device_info()`` arrived in 0.30.4; before it, only ``mx.metal.device_info()`` existed, and it
says nothing without Metal. :func:`device_info` asks whichever this MLX has and never raises, so a
release without either still runs (with less said about the device).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx


def device_info() -> dict[str, Any]:
    """MLX's description of the default device (``device_name``, ``max_buffer_length``, ...); ``{}`` when none."""
    ask = getattr(mx, "device_info", None)
    if ask is None and mx.metal.is_available():
        ask = getattr(mx.metal, "device_info", None)
    if ask is None:
        return {}
    try:
        info = ask()
    except (RuntimeError, ValueError):
        return {}
    return dict(info) if isinstance(info, dict) else {}
