"""Run the GPU kernels' generated source on the CPU: shim headers, MLX's source rules, a host runner, an NVRTC check."""
