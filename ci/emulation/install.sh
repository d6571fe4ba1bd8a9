#!/usr/bin/env bash
# Installs what the aarch64 emulation lane needs on a Debian x86-64 machine, as root:
# the arm64 architecture, qemu's user-mode emulator, the aarch64 cross compiler and the arm64
# libpython (Multi-Arch: same, so it installs beside the native one). Idempotent.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (apt-get)" >&2; exit 2; }
need=()
dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
for pkg in qemu-user-static g++-aarch64-linux-gnu gcc-aarch64-linux-gnu libpython3.11:arm64 libpython3.11-dev:arm64; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
