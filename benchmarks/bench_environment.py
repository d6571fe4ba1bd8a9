"""The MLX release a run measured, so that results of asv's ``existing`` environment name it too.

A virtualenv's results name the release in their parameters (asv.conf.json's
matrix), but ``rmsprop-bench run`` benchmarks the Python at hand, whose
results name no requirement; asv tracks only numbers, so the release is one.
"""

import re

import mlx.core as mx


class Environment:
    def track_mlx_release(self):
        major, minor, patch = (int(n) for n in re.findall(r"\d+", mx.__version__)[:3])
        return major * 10000 + minor * 100 + patch

    track_mlx_release.unit = "MLX release (major*10000 + minor*100 + patch)"
