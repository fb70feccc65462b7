#!/usr/bin/env bash
# Installs everything the demo, the tests and the benchmark need on a fresh Debian 12
# machine, as root. Safe to run again: every step checks before it acts.
set -euo pipefail

need_pkgs=(
  musl-tools            # musl-gcc for the C parts of the static agent (zstd, ring)
  dosfstools mtools     # mkfs.fat / fsck.fat and mtools to build and read FAT file systems
  fusefat               # a FAT32 with < 65,525 clusters, which mtools reads as FAT16: written
                        # through the FAT FUSE driver, read back the same way
  ntfs-3g               # mkntfs, ntfscp, ntfscat, ntfsfix
  gdisk fdisk           # sgdisk / sfdisk to build GPT and MBR disks in plain files
  partclone zstd xz-utils gzip pv curl  # peers for the benchmark and raw-image tests
  nginx-light           # a real HTTP server with Range support
  python3               # http.server for simple serving
  dnsmasq-base busybox-static iproute2 nftables  # discovery tests in network namespaces
  udpcast
  time bc               # GNU time (wall, CPU, peak RSS) and bc for the benchmark ratios
  ipxe                  # iPXE ROMs/undionly.kpxe for the QEMU PXE-boot test (issue 5)
  ovmf grub-efi-amd64-bin  # UEFI firmware and GRUB EFI modules for the flash-install boot test
  grub-common           # grub-editenv: the grubenv cross-check (grub crate, qemu_guest)
  cpio                  # listing initramfs archives in tests and by hand
  openssl binutils      # test CAs for HTTPS tests; readelf for the static-binary check
  kmod                  # depmod: builds modules.dep for the fetched kernel (scripts/fetch-kernel.sh)
  strace                # the deploy power-cut test checks the order of writes and flushes
  systemd util-linux    # systemd-analyze verify (dist/img.service), ionice (autogenic_service)
  chromium chromium-driver libnss3-tools  # web_console: headless Chromium over WebDriver;
                        # certutil puts the server's CA in the browser's NSS database
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
# --- bookworm-backports (issue 5: QEMU boot tests) -----------------------------------------
# qemu-system-x86 must match the preinstalled qemu-utils, which comes from bookworm-backports.
# The suite is added once (same mirror and key as debian.sources) and only QEMU is taken from it.
bpo_sources=/etc/apt/sources.list.d/backports.sources
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat >"$bpo_sources" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  apt-get update -qq
fi
if ! dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null | grep -q "ok installed"; then
  echo "install-deps: installing qemu-system-x86 from bookworm-backports"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86 >/dev/null
fi
# --- end of bookworm-backports block --------------------------------------------------------

# nginx-light's package starts a system nginx on port 80; the tests start their own.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi

if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
fi

# cargo-fuzz builds and runs the fuzz targets (scripts/fuzz-smoke.sh); from crates.io, pinned.
if command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! cargo fuzz --version 2>/dev/null | grep -q "0.13.2"; then
    echo "install-deps: installing cargo-fuzz 0.13.2"
    cargo install cargo-fuzz --version 0.13.2 --locked
  fi
fi
