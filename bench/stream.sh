#!/usr/bin/env bash
# Streaming throughput: 1,000,000 rows loaded in one run, then drained from two fresh slots created
# before the load: once by pg_recvlogical (to /dev/null) and once by `walden run --once` (into real
# Delta tables). Records rows/s, their ratio, walden's peak RSS, and the walsender's CPU seconds for
# each consumer (from /proc). Repeats ROUNDS times and prints medians.
#
#   bench/stream.sh            # ROWS=1000000 ROUNDS=3 by default
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-postgres.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/walden-target}"
ROWS="${ROWS:-1000000}"
ROUNDS="${ROUNDS:-3}"
TXN_ROWS="${TXN_ROWS:-10000}"
. bench/lib.sh

# CPU seconds (user+sys) of the walsender serving application_name $1, sampled until it exits.
walsender_cpu() {
  local app="$1" pid="" last=0 ticks
  ticks=$(getconf CLK_TCK)
  while [ -z "$pid" ]; do
    pid=$("${PSQL[@]}" -c "SELECT pid FROM pg_stat_replication WHERE application_name = '$app'" 2>/dev/null || true)
    sleep 0.05
    [ -f "$W/done-$app" ] && break
  done
  while [ -n "$pid" ] && [ -r "/proc/$pid/stat" ]; do
    last=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo "$last")
    sleep 0.05
  done
  echo "scale=2; $last / $ticks" | bc
}


results=()
for round in $(seq 1 "$ROUNDS"); do
  rm -f "$W"/done-*
  "${PSQL[@]}" <<SQL >/dev/null
DROP TABLE IF EXISTS bench; DROP PUBLICATION IF EXISTS bench;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots;
CREATE TABLE bench (id bigint PRIMARY KEY, account int NOT NULL, label text, amount numeric(12,2), at timestamptz);
CREATE PUBLICATION bench FOR TABLE bench;
SELECT pg_create_logical_replication_slot('recv', 'pgoutput');
SELECT pg_create_logical_replication_slot('walden', 'pgoutput');
SQL
  # the load: ROWS rows in transactions of TXN_ROWS
  "${PSQL[@]}" -c "DO \$\$ BEGIN FOR i IN 0..($ROWS/$TXN_ROWS - 1) LOOP
      INSERT INTO bench SELECT g, g % 1000, 'label-' || g, (g % 100000) / 100.0, '2024-01-01'::timestamptz + g * interval '1 second'
        FROM generate_series(i*$TXN_ROWS + 1, (i+1)*$TXN_ROWS) g;
      COMMIT; END LOOP; END \$\$" >/dev/null
  END_LSN=$("${PSQL[@]}" -c "SELECT pg_current_wal_lsn()")

  walsender_cpu pg_recvlogical >"$W/cpu-recv" &
  t0=$(date +%s.%N)
  "$PG_BIN/pg_recvlogical" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres --slot recv --start \
    -o proto_version=1 -o publication_names=bench --endpos="$END_LSN" -f /dev/null
  t1=$(date +%s.%N)
  touch "$W/done-pg_recvlogical"; wait
  recv_s=$(echo "$t1 - $t0" | bc)

  rm -rf "$W/wh"
  walsender_cpu walden >"$W/cpu-walden" &
  t0=$(date +%s.%N)
  WALDEN_SOURCE__URL="postgres://postgres@127.0.0.1:$PORT/postgres?application_name=walden" \
  WALDEN_SOURCE__SLOT=walden WALDEN_SOURCE__PUBLICATION=bench WALDEN_WAREHOUSE__URL="$W/wh" \
  RUST_LOG=warn /usr/bin/time -f "%M %U %S" -o "$W/rss" ${BENCH_WALDEN_PREFIX:-} "$WALDEN" run --once
  t1=$(date +%s.%N)
  touch "$W/done-walden"; wait
  walden_s=$(echo "$t1 - $t0" | bc)

  recv_rate=$(echo "$ROWS / $recv_s" | bc)
  walden_rate=$(echo "$ROWS / $walden_s" | bc)
  ratio=$(echo "scale=3; $walden_rate / $recv_rate" | bc)
  read -r rss_kib w_user w_sys <"$W/rss"
  rss_mib=$(( rss_kib / 1024 ))
  walden_cpu=$(echo "$w_user + $w_sys" | bc)
  line="$round $recv_s $walden_s $recv_rate $walden_rate $ratio $rss_mib $(cat "$W/cpu-recv") $(cat "$W/cpu-walden") $walden_cpu"
  echo "round $line" >&2
  results+=("$line")
done

col() { printf '%s\n' "${results[@]}" | awk -v c="$1" '{print $c}' | median; }
cat <<MD
| machine | $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r), PostgreSQL $("${PSQL[@]}" -c 'SHOW server_version') |
|---|---|
| rows | $ROWS in transactions of $TXN_ROWS, rounds $ROUNDS (medians) |
| pg_recvlogical → /dev/null | $(col 2) s, $(col 4) rows/s, walsender CPU $(col 8) s |
| walden run --once → Delta | $(col 3) s, $(col 5) rows/s, walsender CPU $(col 9) s |
| ratio walden / pg_recvlogical | $(col 6) |
| walden peak RSS | $(col 7) MiB |
| walden process CPU (user+sys) | $(col 10) s |
MD
