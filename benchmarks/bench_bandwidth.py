"""Each device's memory-bandwidth limit: the yardstick for every GB/s in the other suites."""

from .common import measure_limit


class Bandwidth:
    """The CPU's: a STREAM-style in-place triad on all cores (``rmsprop_impls.measure.bandwidth``).

    The limits are measured once per ``asv run`` in the ``setup_cache`` that ``Step``
    shares, so each tracked limit is the one the fractions were divided by. The
    class keeps its name so that the CPU limit's history continues.
    """

    setup_cache = staticmethod(measure_limit)

    def track_triad_gbps(self, limits):
        return limits["cpu"]

    track_triad_gbps.unit = "GB/s"


class GpuBandwidth:
    """The GPU's: the same triad as MLX ops on ``mx.gpu``; skipped where MLX has no GPU."""

    setup_cache = staticmethod(measure_limit)

    def setup(self, limits):
        if limits["gpu"] is None:
            raise NotImplementedError("n/a (no GPU)")

    def track_triad_gbps(self, limits):
        return limits["gpu"]

    track_triad_gbps.unit = "GB/s"
