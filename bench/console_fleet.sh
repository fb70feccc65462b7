#!/usr/bin/env bash
# How fast the web console's fleet page answers with a few thousand devices.
# Usage: bash bench/console_fleet.sh [DEVICES]   (default 3000)
# Uses target/release/imgserver if built (cargo build --release -p imgserver), else the
# debug build. The devices are written straight into a fresh server's database (each with a
# real-sized inventory: one disk, three partitions), then the page is fetched with curl over
# HTTPS with a signed-in session: the whole fleet, a search, a state filter, the last page.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3000}
BIN=target/release/imgserver
[ -x "$BIN" ] || { cargo build -q -p imgserver; BIN=target/debug/imgserver; }
D=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$D"' EXIT
"$BIN" --data "$D" init >/dev/null
TOKEN=$("$BIN" --data "$D" admin add bench --role viewer 2>/dev/null | grep '^imgadm_')
INV='{"protocol":1,"device":{"mac":"MAC","serial":"SN","model":"TC-100","hostname":"host","ram_bytes":4294967296,"agent_version":"img 0.1.0"},"disks":[{"name":"/dev/mmcblk0","size":15634268160,"table":"gpt","partitions":[{"number":1,"start":1048576,"size":268435456,"fs":"fat32","label":"BOOTAGENT"},{"number":2,"start":269484032,"size":12884901888,"fs":"ntfs","label":"SYSTEM","image":{"name":"os","version":"7.2"}},{"number":3,"start":13154385920,"size":2147483648,"fs":"ntfs","label":"DATA"}],"boot_agent_partition":1}],"autogenic":{}}'
NOW=$(date +%s)
sqlite3 "$D/imgserver.db" <<SQL
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $N)
INSERT INTO devices (mac, grp, serial, model, hostname, ram_bytes, agent_version, inventory,
                     state, image_name, image_version, enrolled, last_seen)
SELECT printf('52:54:00:%02x:%02x:%02x', (i >> 16) & 255, (i >> 8) & 255, i & 255),
       'site-' || (i % 7), 'SN' || i, 'TC-100', 'tc' || i, 4294967296, 'img 0.1.0',
       replace(replace('$INV', 'MAC', printf('52:54:00:%02x:%02x:%02x', (i >> 16) & 255, (i >> 8) & 255, i & 255)), 'SN', 'SN' || i),
       CASE WHEN i % 50 = 0 THEN 'maintenance' ELSE 'operational' END, 'os', '7.2', 1, $NOW - (i % 600)
FROM n;
SQL
"$BIN" --data "$D" serve --listen 127.0.0.1:0 >"$D/out" 2>/dev/null &
PID=$!
for _ in $(seq 50); do grep -q listening "$D/out" 2>/dev/null && break; sleep 0.1; done
PORT=$(sed -n 's/.*127.0.0.1:\([0-9]*\).*/\1/p' "$D/out")
URL="https://localhost:$PORT"
C=(curl -s --cacert "$D/ca.pem" -b "$D/jar" -c "$D/jar")
"${C[@]}" -o /dev/null -H "Origin: $URL" --data-urlencode "token=$TOKEN" "$URL/login"
measure() {
  local what=$1 path=$2 best=999 total=0 t
  for _ in 1 2 3 4 5; do
    t=$("${C[@]}" -o "$D/page" -w '%{time_total}' "$URL$path")
    total=$(echo "$total + $t" | bc -l)
    best=$(echo "if ($t < $best) $t else $best" | bc -l)
  done
  grep -q 'id=fleet' "$D/page" || { echo "no fleet table on $path"; exit 1; }
  printf '%-28s best %.3f s, mean %.3f s, %s bytes\n' "$what" "$best" "$(echo "$total / 5" | bc -l)" "$(wc -c <"$D/page")"
}
echo "fleet page with $N devices ($BIN):"
measure "whole fleet, page 1" "/"
measure "search 'sn12'" "/?q=sn12"
measure "state maintenance" "/?state=maintenance"
measure "last page" "/?page=$((N / 100))"
