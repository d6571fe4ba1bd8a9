"""The machine's memory-bandwidth limit: the yardstick for every GB/s in the other suites."""

from .common import measure_limit


class Bandwidth:
    """STREAM-style in-place triad on all cores (``rmsprop_impls.measure.bandwidth``).

    It is measured once per ``asv run`` in the ``setup_cache`` that ``Step``
    shares, so the tracked limit is the one each fraction was divided by.
    """

    setup_cache = staticmethod(measure_limit)

    def track_triad_gbps(self, limit):
        return limit

    track_triad_gbps.unit = "GB/s"
