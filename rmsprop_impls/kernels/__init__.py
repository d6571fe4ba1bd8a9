"""What runs the update: packed buffers, the Metal and CUDA kernel source and dispatch, the C++ extension."""
