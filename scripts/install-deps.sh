#!/usr/bin/env bash
# Installs everything the demo, the tests and the benchmark need on a fresh Debian 12
# machine, as root. Safe to run again: every step checks before it acts.
set -euo pipefail

need_pkgs=(
  musl-tools            # musl-gcc for the C parts of the static agent (zstd, ring)
  dosfstools mtools     # mkfs.fat / fsck.fat and mtools to build and read FAT file systems
  ntfs-3g               # mkntfs, ntfscp, ntfscat, ntfsfix
  gdisk fdisk           # sgdisk / sfdisk to build GPT and MBR disks in plain files
  partclone zstd xz-utils gzip pv curl  # peers for the benchmark and raw-image tests
  nginx-light           # a real HTTP server with Range support
  python3               # http.server for simple serving
  dnsmasq-base busybox-static iproute2 nftables  # discovery tests in network namespaces
  udpcast
  time bc               # GNU time (wall, CPU, peak RSS) and bc for the benchmark ratios
)

missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# nginx-light's package starts a system nginx on port 80; the tests start their own.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi

if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
fi
