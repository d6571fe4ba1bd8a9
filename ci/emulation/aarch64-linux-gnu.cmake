# CMake toolchain for cross-building the cpu_kernel extension for aarch64 Linux with Debian's
# g++-aarch64-linux-gnu (ci/emulation/run.sh passes it with -DCMAKE_TOOLCHAIN_FILE).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# Programs (the native Python that runs nanobind's --cmake_dir) come from the host; the target's
# mlx wheel and Python headers are named explicitly by run.sh.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
set(CMAKE_CXX_FLAGS_INIT "-Wno-psabi")  # GCC 10.1 ABI notes about std::pair arguments in MLX headers
