"""Timing the variants: trees to time them on, step timing, the bandwidth limit, comparing, choosing, profiling."""
