#!/usr/bin/env bash
# Time from "interface up" to "management server chosen" for `img -discover`, beside busybox
# udhcpc getting a lease alone, on the same set-up: two network namespaces joined by a veth
# pair, the real dnsmasq (DHCP + DNS, options 186/192) and a python http.server as the
# management server. Runs alternate (ours, udhcpc, ours, ...) so both see the same machine
# load; prints both medians and the ratio (issue 3 target: ratio <= 1.5).
#
# usage: sudo bench/discovery.sh [RUNS]      (IMG_BIN=path/to/img to choose the binary)
set -euo pipefail

RUNS=${1:-11}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMG=${IMG_BIN:-$ROOT/target/debug/img}
if [[ -z ${IMG_BIN:-} ]]; then
  (cd "$ROOT" && cargo build -q -p agent 2>/dev/null) || (cd "$ROOT" && cargo build -p agent)
fi
for t in ip dnsmasq busybox python3; do
  command -v "$t" >/dev/null || { echo "missing $t: run scripts/install-deps.sh" >&2; exit 1; }
done

ID=$$
S=dbenchS$ID
C=dbenchC$ID
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$S" 2>/dev/null || true
  ip netns del "$C" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$S"
ip netns add "$C"
ip link add eth0 netns "$S" type veth peer name eth0 netns "$C"
ip -n "$S" addr add 10.77.0.1/24 dev eth0
ip -n "$S" addr add 10.77.0.10/24 dev eth0
ip -n "$S" link set eth0 up
ip -n "$S" link set lo up
ip -n "$C" link set lo up

cat >"$WORK/dnsmasq.conf" <<CONF
interface=eth0
bind-interfaces
except-interface=lo
listen-address=10.77.0.1
no-resolv
no-hosts
no-ping
user=root
log-facility=$WORK/dnsmasq.log
dhcp-range=10.77.0.100,10.77.0.200,255.255.255.0,1h
domain=lab.example
dhcp-option=186,10.77.0.10
dhcp-option=192,80s
CONF
ip netns exec "$S" dnsmasq --no-daemon --conf-file="$WORK/dnsmasq.conf" \
  --pid-file="$WORK/dnsmasq.pid" --dhcp-leasefile="$WORK/leases" 2>"$WORK/dnsmasq.err" &
PIDS+=($!)
ip netns exec "$S" python3 -m http.server 80 --bind 10.77.0.10 >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  grep -q "started, version" "$WORK/dnsmasq.log" 2>/dev/null && break
  sleep 0.05
done
for _ in $(seq 100); do
  ip netns exec "$C" true && ip netns exec "$S" bash -c 'exec 3<>/dev/tcp/10.77.0.10/80' 2>/dev/null && break
  sleep 0.05
done

now_us() { echo $(( $(date +%s%N) / 1000 )); }

# One measurement: the interface starts down without an address; the timed command sets it
# up and runs the client.
measure() {
  ip -n "$C" link set eth0 down
  ip -n "$C" addr flush dev eth0
  local t0 t1
  t0=$(now_us)
  ip netns exec "$C" sh -c "ip link set eth0 up && $1" >"$WORK/out" 2>&1 || {
    echo "failed: $1" >&2; cat "$WORK/out" >&2; exit 1; }
  t1=$(now_us)
  echo $(( t1 - t0 ))
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }

OURS=()
UDHCPC=()
for i in $(seq "$RUNS"); do
  OURS+=("$(measure "$IMG -discover -json")")
  grep -q '"url": "http://10.77.0.10:80"' "$WORK/out" || { echo "img chose no server:" >&2; cat "$WORK/out" >&2; exit 1; }
  UDHCPC+=("$(measure "busybox udhcpc -i eth0 -n -q -f -s /bin/true")")
done

o=$(printf '%s\n' "${OURS[@]}" | median)
u=$(printf '%s\n' "${UDHCPC[@]}" | median)
echo "runs:                                   $RUNS (alternating)"
echo "img -discover (lease + server chosen):  median $(awk -v x="$o" 'BEGIN{printf "%.1f", x/1000}') ms   [$(printf '%s ' "${OURS[@]}" | awk '{for(i=1;i<=NF;i++) printf "%.1f ", $i/1000}')]"
echo "busybox udhcpc (lease only):            median $(awk -v x="$u" 'BEGIN{printf "%.1f", x/1000}') ms   [$(printf '%s ' "${UDHCPC[@]}" | awk '{for(i=1;i<=NF;i++) printf "%.1f ", $i/1000}')]"
echo "ratio img/udhcpc:                       $(awk -v o="$o" -v u="$u" 'BEGIN{printf "%.2f", o/u}') (target <= 1.5)"
