"""Each device's memory-bandwidth roof: the yardstick for every GB/s in the other suites."""

import math

from .common import measure_limit, roof_sweep, safe_import

SWEEP = ("16",)  # a commit from before the roof: only its one limit, beyond the caches
with safe_import():
    from rmsprop_impls.measure.roof import SWEEP


class Bandwidth:
    """The CPU's roof beyond the caches (``rmsprop_impls.measure.roof``), and its last-level cache.

    The roofs are measured once per ``asv run`` in the ``setup_cache`` that ``Step``
    shares, so each tracked figure is the one the fractions were divided by. The
    class and its benchmark keep their names so that the CPU limit's history
    continues: before the roof, the figure was an in-place triad's at 512 MiB.
    """

    setup_cache = staticmethod(measure_limit)

    def track_triad_gbps(self, limits):
        return getattr(limits["cpu"], "beyond_caches", limits["cpu"])

    track_triad_gbps.unit = "GB/s"

    def track_last_level_cache_bytes(self, limits):
        """What the report calls cache-resident: a working set up to this many bytes; NaN where unknown."""
        return getattr(limits["cpu"], "last_level_cache", None) or math.nan

    track_last_level_cache_bytes.unit = "bytes"


class GpuBandwidth:
    """The GPU's roof beyond the caches, from MLX ops on ``mx.gpu``; skipped where MLX has no GPU."""

    setup_cache = staticmethod(measure_limit)

    def setup(self, limits):
        if limits["gpu"] is None:
            raise NotImplementedError("n/a (no GPU)")

    def track_triad_gbps(self, limits):
        return getattr(limits["gpu"], "beyond_caches", limits["gpu"])

    track_triad_gbps.unit = "GB/s"


class Roof:
    """The CPU's roof at each working set of the sweep (a multiple of the last-level cache): GB/s and bytes."""

    params = list(SWEEP)
    param_names = ["of_llc"]
    setup_cache = staticmethod(measure_limit)
    device = "cpu"

    def setup(self, limits, of_llc):
        self.roof_, self.size_ = roof_sweep(limits, self.device, of_llc)

    def track_gbps(self, limits, of_llc):
        return self.roof_.at(self.size_)

    track_gbps.unit = "GB/s"

    def track_working_set_bytes(self, limits, of_llc):
        return self.size_

    track_working_set_bytes.unit = "bytes"


class GpuRoof(Roof):
    """The GPU's, over the CPU's sweep (MLX reports no GPU cache sizes); skipped where MLX has no GPU."""

    device = "gpu"
