#!/usr/bin/env bash
# The demo: builds a small thin-client disk (GPT: a 16 MiB boot-agent partition and a FAT32
# OS partition with files), captures it with `img -make`, serves the image over HTTP on
# loopback, deploys it with `img -restore` into a fresh disk-image file, and checks the copy
# with the real tools. Then the whole management loop: the reference server `imgserver`
# (TLS with its own CA) registers the image and schedules it for a device; the agent checks
# in, deploys, reports; the server shows the device Operational with the new image.
# Everything stays in ./demo-out and on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "== building the static agent and the reference server"
cargo build --locked --release --target x86_64-unknown-linux-musl -p agent 2>&1 | tail -1
cargo build --locked -p imgserver 2>&1 | tail -1
img="$PWD/target/x86_64-unknown-linux-musl/release/img"
imgserver="$PWD/target/debug/imgserver"

out="$PWD/demo-out"
rm -rf "$out"; mkdir -p "$out/www" "$out/files"
cd "$out"

echo "== making a device disk: GPT, BOOTAGENT (FAT 16 MiB) + OS (FAT32 239 MiB)"
truncate -s 256M device.img
sgdisk -n 1:2048:+16M -t 1:0700 -c 1:BOOTAGENT -n 2:0:0 -t 2:0700 -c 2:OS device.img >/dev/null
p1=$((2048 * 512)); p2=$(( $(sgdisk -i 2 device.img | awk '/First sector/ {print $3}') * 512 ))
p2_sectors=$(( $(sgdisk -i 2 device.img | awk '/Partition size/ {print $3}') ))
# 16 MiB holds too few clusters for FAT32 by the FAT specification: mkfs.fat picks FAT16.
mkfs.fat -n BOOTAGENT --offset=2048 device.img $((16 * 1024)) >/dev/null
mkfs.fat -F 32 -n OS --offset=$((p2 / 512)) device.img $((p2_sectors / 2)) >/dev/null
head -c 20M /dev/urandom > files/system.bin
head -c 30M < <(yes "thin client configuration line") > files/config.txt
echo "grub config placeholder" > files/grub.cfg
mcopy -i "device.img@@$p1" files/grub.cfg ::/
mmd -i "device.img@@$p2" ::/Windows
mcopy -i "device.img@@$p2" files/system.bin files/config.txt ::/Windows/

echo "== img -dump device.img"
"$img" -dump device.img

echo "== img -make: capture the whole disk (used blocks only)"
"$img" -make www/device.fimg -disk=device.img -name=demo-os -version=1.0 -model=DEMO
ls -l device.img www/device.fimg | awk '{print "   " $5 " bytes  " $9}'
du -k device.img | awk '{print "   device.img occupies " $1 " KiB on disk"}'

echo "== img -keygen / -sign: devices deploy only images signed by a key they trust"
"$img" -keygen "$out/fleet.key" >/dev/null
"$img" -sign www/device.fimg -key="$out/fleet.key"

echo "== img -info"
"$img" -info www/device.fimg

echo "== serving it over HTTP on 127.0.0.1 (python3 http.server)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 --directory www "$port" >/dev/null 2>&1 &
srv=$!
mgmt=
trap 'kill $srv $mgmt 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done

echo "== img -restore http://127.0.0.1:$port/device.fimg -disk=new-device.img -trust=fleet.key.pub"
# A restore never creates its target: the new device's disk, as large as the old one.
truncate -s "$(stat -c %s device.img)" new-device.img
"$img" -restore "http://127.0.0.1:$port/device.fimg" -disk=new-device.img -state="$out/state" -trust="$out/fleet.key.pub"

echo "== checking the copy with the real tools"
sgdisk -v new-device.img | grep -q "No problems found" && echo "   sgdisk -v new-device.img: no problems found"
for part in "$p1:BOOTAGENT" "$p2:OS"; do
  off=${part%%:*}; name=${part##*:}
  dd if=new-device.img of=part.img bs=1M iflag=skip_bytes,count_bytes skip=$off count=$((off == p1 ? 16*1024*1024 : p2_sectors*512)) status=none
  fsck.fat -n part.img >/dev/null && echo "   fsck.fat -n $name: clean"
done
mcopy -n -i "new-device.img@@$p2" ::/Windows/system.bin ::/Windows/config.txt . 
mcopy -n -i "new-device.img@@$p1" ::/grub.cfg .
cmp system.bin files/system.bin && cmp config.txt files/config.txt && cmp grub.cfg files/grub.cfg \
  && echo "   every file read back with mtools is byte-identical"
du -k new-device.img | awk '{print "   new-device.img occupies " $1 " KiB on disk (unused space left as holes)"}'

echo "== the management loop: imgserver on https://127.0.0.1, one device checking in"
kill $srv 2>/dev/null || true
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$imgserver" --data srv init | sed 's/^/   /'
"$imgserver" --data srv serve --listen "127.0.0.1:$mport" > server.log 2>&1 &
mgmt=$!
for _ in $(seq 100); do curl -s -o /dev/null --cacert srv/ca.pem "https://127.0.0.1:$mport/" && break; sleep 0.1; done
"$img" -make os-2.fimg -disk=device.img -name=demo-os -version=2.0 -model=DEMO 2>/dev/null
"$img" -sign os-2.fimg -key="$out/fleet.key" >/dev/null
mkdir -p trusted.d && cp "$out/fleet.key.pub" trusted.d/fleet.pub
"$imgserver" --data srv image add os-2.fimg | sed 's/^/   /'
"$imgserver" --data srv schedule add --mac 52:54:00:12:34:56 --image demo-os:2.0 --then no-reboot | sed 's/^/   /'
truncate -s 256M fleet-device.img
echo "== img -checkin (the agent's loop, as the boot agent runs it after discovery)"
"$img" -checkin -server="https://127.0.0.1:$mport" -ca=srv/ca.pem -state=agent-state \
  -disk=fleet-device.img -mac=52:54:00:12:34:56 -model=DEMO -trust-dir=trusted.d -loop
echo "== what the server recorded"
"$imgserver" --data srv devices | sed 's/^/   /'
"$imgserver" --data srv devices | grep 52:54:00:12:34:56 | grep -q Operational \
  && echo "   the device is Operational with demo-os 2.0"
mcopy -n -i "fleet-device.img@@$p2" ::/Windows/system.bin fleet-system.bin
cmp fleet-system.bin files/system.bin && echo "   the fleet device's files are byte-identical to the source"
echo "== demo done: see $out"
