#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test masnet-wgpu:
# a Vulkan loader and Mesa's software drivers (lavapipe for Vulkan, llvmpipe for GL),
# so GPU tests run on any machine, with or without a GPU.
set -euo pipefail
need=()
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
ldconfig -p | grep -q 'libvulkan.so.1' || need+=(libvulkan1)
ldconfig -p | grep -q 'libEGL.so.1' || need+=(libegl1)
ls /usr/lib/*/dri/swrast_dri.so >/dev/null 2>&1 || need+=(libgl1-mesa-dri)
ldconfig -p | grep -q 'libEGL_mesa.so.0' || need+=(libegl-mesa0)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
echo "setup: ok"
