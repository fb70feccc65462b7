#!/usr/bin/env bash
# Fetches the Debian kernel the QEMU boot tests and the PXE examples use
# (linux-image-cloud-amd64: small, virtio drivers as modules) with `apt-get download`, and
# unpacks vmlinuz and its modules into a cache folder without installing the package.
#
#   scripts/fetch-kernel.sh [CACHE_DIR]     default: target/kernel (or $IMG_KERNEL_CACHE)
#
# Afterwards CACHE_DIR/vmlinuz is the kernel, CACHE_DIR/modules/ holds lib/modules/<version>
# (modules.dep included) and CACHE_DIR/version names the version. Safe to run again: when
# the cache is complete nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${1:-${IMG_KERNEL_CACHE:-target/kernel}}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

if [ -s "$cache/vmlinuz" ] && [ -s "$cache/version" ] \
  && [ -f "$cache/modules/lib/modules/$(cat "$cache/version")/modules.dep" ]; then
  echo "fetch-kernel: $cache/vmlinuz ($(cat "$cache/version")) already present"
  exit 0
fi

# linux-image-cloud-amd64 is a meta package; the real image package is its dependency.
real="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
  | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$real" ]; then
  echo "fetch-kernel: cannot resolve linux-image-cloud-amd64 (run apt-get update?)" >&2
  exit 1
fi

work="$(mktemp -d)"
chmod 0755 "$work"  # apt downloads as _apt when it can reach the folder
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "$real" >/dev/null)
deb="$(ls "$work"/*.deb)"
dpkg-deb -x "$deb" "$work/root"

version="$(ls "$work/root/lib/modules" | head -n1)"
rm -rf "$cache/modules"
mkdir -p "$cache/modules/lib/modules"
mv "$work/root/lib/modules/$version" "$cache/modules/lib/modules/"
# Debian ships modules.dep only after depmod runs in the postinst; build it here, in the
# cache, so the initramfs builder can follow dependencies.
if [ ! -f "$cache/modules/lib/modules/$version/modules.dep" ]; then
  depmod -b "$cache/modules" "$version"
fi
cp "$work/root/boot/vmlinuz-$version" "$cache/vmlinuz"
echo "$version" >"$cache/version"
echo "fetch-kernel: $cache/vmlinuz ($version, $(stat -c %s "$cache/vmlinuz") bytes) and modules"
