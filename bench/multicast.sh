#!/usr/bin/env bash
# Multicast benchmark: `img -session` against udpcast (udp-sender / udp-receiver), side by side
# in one run, on the same image bytes, in a lab of network namespaces on one bridge (nothing
# touches the host's network). Prints ratios next to the targets of the multicast issue; the
# machine is shared and noisy: compare within a run, never across runs.
#
#   bash bench/multicast.sh                 FAT32 disk of 256 MiB, ~160 MiB of files
#   SIZE_MIB=128 bash bench/multicast.sh    smaller, for a quick look
#   COUNTS="1 2 4 8" LOSSES="0 2" SLOW_KBIT=40000 override the matrix (SLOW_KBIT=0: no slow case)
#   IMG=/path/to/img bash bench/multicast.sh   another build of img (default: release, musl)
#   RUN_TIMEOUT=120                         seconds before a hung sender or receiver is stopped (failed)
#   KEEP_LOGS=DIR                           keep every run's sender and receiver logs under DIR
#                                           (with IMG_SESSION_DEBUG=1: the master's and clients' timelines)
#   REPEAT=3                                every session N times: the median time counts, and a run counts as
#                                           correct only if all N were (one ARP exchange lost at 2 % loss costs
#                                           a device the kernel's 1 s retry, in either tool: one run is a lottery)
#   ONLY=img                                our runs only (no udpcast, no ratios): a quick look while developing
#   LINK_MBIT=100                           the sender's link rate in Mbit/s (default 100, a classroom or
#                                           branch switch port); LINK_MBIT=0: unlimited (the bridge is then
#                                           as fast as the CPUs, and every run is CPU-bound)
#
# The image: one FAT32 disk made with mkfs.fat + mtools, files half text half random, captured
# once with `img -make` into src.fimg. Both tools move exactly those bytes:
#   ours:     img -session NAME -master -clients=N -image=src.fimg
#             img -session NAME -client -disk=tI.img     (verifies, decompresses, writes the disk)
#   udpcast:  udp-sender --file src.fimg --min-receivers N --nokbd
#             udp-receiver --file tI.fimg --nokbd          (writes the image bytes as they come)
# Every target is a file in the same tmpfs, so neither side pays for a disk the other does not.
# udpcast's settings: its defaults at 0 % loss (that is its fastest there); at 2 % loss it
# runs twice, defaults and with its FEC (--fec 8x8/128: 8 repair blocks per 128-block stripe,
# 6 % redundancy, enough for 2 % random loss), and the faster of the two is its figure.
# Loss: nftables `numgen random mod 100 < N drop` on every bridge port (the master's too, so
# acknowledgements and repair requests are lost as well); this kernel has no netem.
# The slow receiver: a tbf qdisc on its bridge port (SLOW_KBIT kbit/s).
# The link: a tbf qdisc on the sender's own interface (eth0 in its namespace), for both tools alike,
# with a queue of 1000 full frames (a NIC's default txqueuelen), so the wire and not the CPUs sets the
# pace, as on a LAN; a sender that overruns it loses packets in its own queue, as on a real NIC.
# Measured: completion time from the sender's start to the last receiver's exit; bytes the
# master's veth sent (/sys/class/net/eth0/statistics/tx_bytes in its namespace: whole Ethernet
# frames, so a full 1472-byte datagram costs 1514 bytes), and the UDP payload that left the sender
# (an nft counter on the ingress of its bridge port: IP bytes less 28 per datagram, no Ethernet, IP or UDP
# header, but our own 32-byte packet header and udpcast's are in it); CPU (user + system, GNU time) and page faults per
# receiver and of the sender; every receiver's result is checked (cmp) against the source.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

[ "$(id -u)" = 0 ] || { echo "bench/multicast.sh needs root (network namespaces)" >&2; exit 1; }
bash scripts/install-deps.sh >/dev/null
dpkg-query -W -f='${Status}' time 2>/dev/null | grep -q "ok installed" || apt-get install -y -qq time >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
if [ -n "${IMG:-}" ]; then img=$IMG; else
  cargo build --locked --release --target x86_64-unknown-linux-musl -p agent 2>&1 | tail -1
  img="$root/target/x86_64-unknown-linux-musl/release/img"
fi

size_mib=${SIZE_MIB:-256}
counts=${COUNTS:-"1 2 4 8"}
losses=${LOSSES:-"0 2"}
slow_kbit=${SLOW_KBIT:-40000}
link_mbit=${LINK_MBIT:-100}
tmo=${RUN_TIMEOUT:-120}  # a receiver still running then counts as failed
maxn=8
for n in $counts; do [ "$n" -gt "$maxn" ] && maxn=$n; done

work=/dev/shm/img-bench-mcast-$$
id=mb$$
hub=${id}h
rm -rf "$work"; mkdir -p "$work/trust"

cleanup() {
  for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$id" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# ---- the lab: a bridge in its own namespace, m0 and c0..c(maxn-1) on veths
ip netns add "$hub"
ip -n "$hub" link set lo up
ip -n "$hub" link add br0 type bridge mcast_snooping 0
ip -n "$hub" link set br0 up
node() {  # NAME ADDRESS
  local ns=$id$1
  ip netns add "$ns"
  ip link add eth0 netns "$ns" type veth peer name "p$1" netns "$hub"
  ip -n "$hub" link set "p$1" master br0
  ip -n "$hub" link set "p$1" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$2/24" brd + dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add 224.0.0.0/4 dev eth0
}
node m0 10.89.0.1
for ((i = 0; i < maxn; i++)); do node "c$i" "10.89.0.$((101 + i))"; done
ports="pm0 $(for ((i = 0; i < maxn; i++)); do printf 'pc%d ' "$i"; done)"

set_loss() {  # PERCENT, on every port
  { echo "table bridge lab { }"; echo "delete table bridge lab"  # only the loss table: the UDP counter stays
    echo "table bridge lab {"
    echo "  chain ports {"
    echo "    type filter hook forward priority 0; policy accept;"
    if [ "$1" -gt 0 ]; then for p in $ports; do echo "    oifname \"$p\" numgen random mod 100 < $1 drop"; done; fi
    echo "  }"
    echo "}"; } > "$work/loss.nft"
  ip netns exec "$hub" nft -f "$work/loss.nft"
}
# The sender's link.
if [ "$link_mbit" != 0 ]; then
  burst=$((link_mbit * 125)); [ "$burst" -lt 15140 ] && burst=15140  # 1 ms of the rate, at least 10 frames
  ip netns exec "${id}m0" tc qdisc replace dev eth0 root tbf rate "${link_mbit}mbit" burst "$burst" limit 1514000
fi
# The UDP counter sits on the sender's bridge port (the hub's ingress from pm0): it counts what
# left the sender on the wire, not datagrams its own queue dropped.
ip netns exec "$hub" nft -f - <<'NFT'
table netdev bench {
  counter udpout { }
  chain in {
    type filter hook ingress device "pm0" priority 0; policy accept;
    ip protocol udp counter name "udpout"
  }
}
NFT
udp_reset() { ip netns exec "$hub" nft reset counter netdev bench udpout >/dev/null; }
udp_payload() {  # UDP payload bytes sent since the last udp_reset: IP bytes less 20 + 8 per datagram
  ip netns exec "$hub" nft list counter netdev bench udpout | awk '/packets/ {
    for (i = 1; i < NF; i++) { if ($i == "packets") p = $(i + 1); if ($i == "bytes") b = $(i + 1) }
    print b - 28 * p }'
}
set_slow() { ip netns exec "$hub" tc qdisc replace dev "pc$1" root tbf rate "${2}kbit" burst 32kbit latency 400ms; }
clear_slow() { ip netns exec "$hub" tc qdisc del dev "pc$1" root 2>/dev/null || true; }
tx_bytes() { ip netns exec "${id}m0" cat /sys/class/net/eth0/statistics/tx_bytes; }
now() { date +%s.%N; }

# ---- the image
fill() {  # DIR MIB: files of 16 MiB, half text, half random
  local dir=$1 total=$2 i=0
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
mkfs.fat -F 32 -n BENCH -C "$work/src.img" $((size_mib * 1024)) >/dev/null
fill "$work/files" $((size_mib * 5 / 8))
mcopy -s -i "$work/src.img" "$work/files"/* ::/
rm -rf "$work/files"
IMG_QUIET=1 "$img" -make "$work/src.fimg" -disk="$work/src.img" >/dev/null 2>&1
payload=$(stat -c %s "$work/src.fimg")
disk_len=$(stat -c %s "$work/src.img")

# run_once TOOL N [udpcast flags...]: one session; sets T (s), T_OTHERS (all but the last
# receiver, for the slow case), WIRE (Ethernet frame bytes), UDP (UDP payload bytes), CPU (mean s per receiver), MCPU (sender's s),
# OK (correct receivers).
run_once() {
  local tool=$1 n=$2; shift 2
  local extra="$*" i pids=() start tx0 mpid name="bench$RANDOM"
  rm -f "$work"/t[0-9]* "$work"/end.* "$work"/cpu.* "$work"/rc.* "$work"/*.log "$work"/mcpu
  for ((i = 0; i < n; i++)); do
    if [ "$tool" = img ]; then truncate -s "$disk_len" "$work/t$i.img"; mkdir -p "$work/state$i"; fi
  done
  udp_reset; tx0=$(tx_bytes); start=$(now)
  if [ "$tool" = img ]; then
    ip netns exec "${id}m0" /usr/bin/time -f "%U %S" -o "$work/mcpu" timeout -k 5 "$tmo" "$img" -session "$name" -master -clients="$n" \
      -image="$work/src.fimg" > "$work/master.log" 2>&1 & mpid=$!
  else
    # shellcheck disable=SC2086
    ip netns exec "${id}m0" /usr/bin/time -f "%U %S" -o "$work/mcpu" timeout -k 5 "$tmo" udp-sender --file "$work/src.fimg" --interface eth0 \
      --min-receivers "$n" --nokbd --no-progress ${UDPCAST_FLAGS:-} $extra > "$work/master.log" 2>&1 & mpid=$!
  fi
  for ((i = 0; i < n; i++)); do
    (
      if [ "$tool" = img ]; then
        ip netns exec "${id}c$i" env IMG_STATE_DIR="$work/state$i" IMG_TRUSTED_DIR="$work/trust" \
          /usr/bin/time -f "%U %S %R %F" -o "$work/cpu.$i" timeout -k 5 "$tmo" \
          "$img" -session "$name" -client -disk="$work/t$i.img" > "$work/c$i.log" 2>&1 && rc=0 || rc=$?
      else
        ip netns exec "${id}c$i" /usr/bin/time -f "%U %S %R %F" -o "$work/cpu.$i" timeout -k 5 "$tmo" \
          udp-receiver --file "$work/t$i.fimg" --interface eth0 --nokbd --no-progress > "$work/c$i.log" 2>&1 && rc=0 || rc=$?
      fi
      now > "$work/end.$i"; echo "$rc" > "$work/rc.$i"
    ) & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  wait "$mpid" || true
  WIRE=$(( $(tx_bytes) - tx0 )); UDP=$(udp_payload)
  T=0; T_OTHERS=0; CPU=0; FLT=0; OK=0
  read -r MCPU < <(tail -1 "$work/mcpu" 2>/dev/null | awk '{print $1 + $2}' || echo 0)
  MCPU=${MCPU:-0}
  for ((i = 0; i < n; i++)); do
    local e c u s minf majf
    e=$(echo "$(cat "$work/end.$i") - $start" | bc -l)
    T=$(echo "if ($e > $T) $e else $T" | bc -l)
    if [ "$i" -lt $((n - 1)) ]; then T_OTHERS=$(echo "if ($e > $T_OTHERS) $e else $T_OTHERS" | bc -l); fi
    read -r u s minf majf < <(tail -1 "$work/cpu.$i" 2>/dev/null || echo "0 0 0 0")
    CPU=$(echo "$CPU + ($u + $s) / $n" | bc -l)
    FLT=$(echo "$FLT + (${minf:-0} + ${majf:-0}) / $n" | bc -l)
    if [ "$(cat "$work/rc.$i")" = 0 ]; then
      if [ "$tool" = img ]; then cmp -s "$work/t$i.img" "$work/src.img" && OK=$((OK + 1));
      else cmp -s "$work/t$i.fimg" "$work/src.fimg" && OK=$((OK + 1)); fi
    fi
  done
  if [ "$OK" -ne "$n" ]; then
    echo "  !! $tool with $n receivers: only $OK correct; first failing receiver's output:" >&2
    for ((i = 0; i < n; i++)); do [ "$(cat "$work/rc.$i")" = 0 ] || { tail -5 "$work/c$i.log" >&2; break; }; done
    tail -5 "$work/master.log" >&2
  fi
  # The master's own traffic figures (packets, repairs, extra passes): where the wire bytes go.
  if [ "$tool" = img ]; then grep -o "[0-9]* packets, .*" "$work/master.log" | sed 's/^/    master: /' || true; fi
  if [ -n "${KEEP_LOGS:-}" ]; then  # each run's logs, to read where the time went
    local keep="$KEEP_LOGS/$tool-n$n-$(date +%H%M%S%N)"; mkdir -p "$keep"; cp "$work"/*.log "$work"/end.* "$keep"/ 2>/dev/null || true
    echo "$start" > "$keep/start"
  fi
  rm -f "$work"/t[0-9]*.img "$work"/t[0-9]*.fimg; rm -rf "$work"/state*
}

# run TOOL N [udpcast flags...]: REPEAT sessions (default 1) of run_once. T and T_OTHERS are
# the medians of the runs' (the upper middle of an even count), the other figures those of the
# run with the median T, and OK the fewest correct receivers of any run, so a failed run shows.
# TIMES lists every run's time.
run() {
  local reps=${REPEAT:-1} r okmin="" sel
  local -a runs=() others=()
  for ((r = 0; r < reps; r++)); do
    run_once "$@"
    runs+=("$T $WIRE $UDP $CPU $FLT $MCPU")
    others+=("$T_OTHERS")
    if [ -z "$okmin" ] || [ "$OK" -lt "$okmin" ]; then okmin=$OK; fi
  done
  sel=$(printf '%s\n' "${runs[@]}" | sort -g -k1,1 | sed -n "$((reps / 2 + 1))p")
  read -r T WIRE UDP CPU FLT MCPU <<< "$sel"
  T_OTHERS=$(printf '%s\n' "${others[@]}" | sort -g | sed -n "$((reps / 2 + 1))p")
  OK=$okmin
  TIMES=$(printf '%s\n' "${runs[@]}" | awk '{printf "%.2f ", $1}')
}

# ratio A B: A / B with two decimals, or "n/a" when either is missing or B is zero.
ratio() {
  if [ -z "${1:-}" ] || [ -z "${2:-}" ] || [ "$(echo "$2 == 0" | bc -l)" = 1 ]; then echo "n/a"; return; fi
  echo "scale=3; $1 / $2" | bc -l | awk '{printf "%.2f", $1}'
}
report() {  # LABEL N
  printf "  %-44s %7.2f s  frames %6.3fx udp %6.3fx payload  cpu/receiver %6.2f s  page faults/receiver %7.0f  sender cpu %6.2f s  correct %d/%d%s\n" \
    "$1" "$T" "$(echo "$WIRE / $payload" | bc -l)" "$(echo "$UDP / $payload" | bc -l)" "$CPU" "$FLT" "$MCPU" "$OK" "$2" \
    "$([ "${REPEAT:-1}" -gt 1 ] && echo "  (median of $REPEAT: ${TIMES% }s)")"
}

echo "== multicast: img -session vs udpcast $(dpkg-query -W -f='${Version}' udpcast 2>/dev/null)"
echo "   machine: $(nproc) cores (sender and all receivers share them: 8 receivers contend for CPU)"
echo "   image: FAT32 ${size_mib} MiB disk, src.fimg $payload bytes (the payload both tools send)"
if [ "$link_mbit" = 0 ]; then
  echo "   link: unlimited (LINK_MBIT=0): the bridge is as fast as the CPUs, so every run is CPU-bound"
else
  echo "   link: ${link_mbit} Mbit/s on the sender's interface (tbf, 1000-frame queue), both tools alike (LINK_MBIT=${link_mbit})"
fi
echo "   loss on every bridge port with nft numgen; slow receiver: tbf ${slow_kbit} kbit/s"
echo "   frames = Ethernet frame bytes the sender's veth sent / payload; ours has a floor of 1514/1440 = 1.051 (frame, IP, UDP and our 32-byte header per 1440-byte symbol) plus repairs"
echo "   udp = UDP payload bytes that left the sender (counted on its bridge port) / payload (no Ethernet, IP or UDP headers; each tool's own packet header is in it); ours has a floor of 1472/1440 = 1.022"
summary=()
declare -A Ti Tu Wi Wu Ui Uu
for loss in $losses; do
  set_loss "$loss"
  echo "-- ${loss}% loss"
  for n in $counts; do
    # Ours: a run counts only when every receiver ended with the source's bytes.
    run img "$n"; report "img -session, $n receiver(s)" "$n"
    ci=$CPU; okd="$OK/$n"
    if [ "$OK" -eq "$n" ]; then Ti[$loss,$n]=$T; Wi[$loss,$n]=$WIRE; Ui[$loss,$n]=$UDP; else Ti[$loss,$n]=""; Wi[$loss,$n]=""; Ui[$loss,$n]=""; fi
    mi=$MCPU
    # udpcast: its best correct setting (defaults, and its FEC when there is loss).
    Tu[$loss,$n]=""; Wu[$loss,$n]=""; Uu[$loss,$n]=""; cu=""; mu=""; uflags="no correct run"
    if [ "${ONLY:-}" = img ]; then
      summary+=("${loss}% loss, $n rcv: ours correct $okd; ours $(ratio "${Wi[$loss,$n]}" "$payload")x payload in frames, $(ratio "${Ui[$loss,$n]}" "$payload")x in UDP payload (udpcast not run: ONLY=img)")
      continue
    fi
    run udpcast "$n"; report "udpcast defaults, $n receiver(s)" "$n"
    if [ "$OK" -eq "$n" ]; then Tu[$loss,$n]=$T; Wu[$loss,$n]=$WIRE; Uu[$loss,$n]=$UDP; cu=$CPU; mu=$MCPU; uflags="defaults"; fi
    if [ "$loss" -gt 0 ]; then
      run udpcast "$n" --fec 8x8/128; report "udpcast --fec 8x8/128, $n receiver(s)" "$n"
      if [ "$OK" -eq "$n" ] && { [ -z "${Tu[$loss,$n]}" ] || (( $(echo "$T < ${Tu[$loss,$n]}" | bc -l) )); }; then
        Tu[$loss,$n]=$T; Wu[$loss,$n]=$WIRE; Uu[$loss,$n]=$UDP; cu=$CPU; mu=$MCPU; uflags="--fec 8x8/128"
      fi
    fi
    target=1.25; [ "$loss" -gt 0 ] && target=2
    wtarget=""; [ "$loss" -gt 0 ] && wtarget=" (target: ours <= 1.06x payload; in frames the floor at 2 % loss is 1.051/0.98 = 1.072)"
    summary+=("${loss}% loss, $n rcv: ours correct $okd; speed vs udpcast ($uflags) $(ratio "${Tu[$loss,$n]}" "${Ti[$loss,$n]}")x (target >= $target); frames ours $(ratio "${Wi[$loss,$n]}" "$payload")x / udpcast $(ratio "${Wu[$loss,$n]}" "$payload")x payload; UDP payload ours $(ratio "${Ui[$loss,$n]}" "$payload")x / udpcast $(ratio "${Uu[$loss,$n]}" "$payload")x$wtarget; cpu ours/udpcast per receiver $(ratio "$ci" "$cu")x, sender $(ratio "$mi" "$mu")x")
  done
  first=${counts%% *}; last=${counts##* }
  summary+=("${loss}% loss: T($last)/T($first) ours $(ratio "${Ti[$loss,$last]}" "${Ti[$loss,$first]}") (target <= 1.1), udpcast $(ratio "${Tu[$loss,$last]}" "${Tu[$loss,$first]}")")
done

set_loss 0
if [ "$slow_kbit" != 0 ] && [ "${ONLY:-}" = img ]; then
  echo "-- one slow receiver of 4 (c3 at ${slow_kbit} kbit/s), 0% loss (ours only)"
  run img 4; report "img -session, 4 receivers, unimpeded" 4; ti_free=$T
  set_slow 3 "$slow_kbit"
  run img 4; report "img -session, 4 receivers, c3 slow" 4
  printf "  %-44s others done at %.2f s (unimpeded %.2f s)\n" "" "$T_OTHERS" "$ti_free"
  clear_slow 3
  summary+=("slow receiver: the others' time / unimpeded: ours $(ratio "$T_OTHERS" "$ti_free")x (target <= 1.2)")
  slow_kbit=0
fi
if [ "$slow_kbit" = 0 ]; then  # SLOW_KBIT=0: no slow-receiver case (a quicker look)
  echo; echo "== summary ($(nproc) cores, link $([ "$link_mbit" = 0 ] && echo unlimited || echo "$link_mbit Mbit/s"); speed = udpcast time / our time, higher is better)"
  printf '%s\n' "${summary[@]}"; exit 0
fi
echo "-- one slow receiver of 4 (c3 at ${slow_kbit} kbit/s), 0% loss"
run img 4; report "img -session, 4 receivers, unimpeded" 4; ti_free=$T; oki="$OK"
run udpcast 4; report "udpcast defaults, 4 receivers, unimpeded" 4; tu_free=$T; oku="$OK"
set_slow 3 "$slow_kbit"
run img 4; report "img -session, 4 receivers, c3 slow" 4; oki="$oki+$OK"
printf "  %-44s others done at %.2f s (unimpeded %.2f s)\n" "" "$T_OTHERS" "$ti_free"; ti_oth=$T_OTHERS
run udpcast 4; report "udpcast defaults, 4 receivers, c3 slow" 4; oku="$oku+$OK"
printf "  %-44s others done at %.2f s (unimpeded %.2f s)\n" "" "$T_OTHERS" "$tu_free"; tu_oth=$T_OTHERS
clear_slow 3
summary+=("slow receiver (1 of 4 at ${slow_kbit} kbit/s): the others' time / unimpeded: ours $(ratio "$ti_oth" "$ti_free")x (target <= 1.2; correct $oki of 4+4), udpcast $(ratio "$tu_oth" "$tu_free")x (correct $oku of 4+4)")

echo
echo "== summary ($(nproc) cores, link $([ "$link_mbit" = 0 ] && echo unlimited || echo "$link_mbit Mbit/s"); speed = udpcast time / our time, higher is better)"
printf '%s\n' "${summary[@]}"
