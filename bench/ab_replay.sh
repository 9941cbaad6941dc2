#!/usr/bin/env bash
# A/B of two walden binaries on one large transaction: 1,000,000 updates of a 5,000,000-row
# mirror, replayed from a copy of the slot (pg_copy_logical_replication_slot) into a copy of the
# warehouse, the binaries alternating N times each. Prints each replay's whole run and apply
# phase (from the commit's arrival, "applying it in parts", to the run's end) in seconds. The
# receive phase is the walsender's pace and moves between replays; the apply phase is walden's.
#
#   bench/ab_replay.sh OLD_BINARY NEW_BINARY     # N=3 by default
set -euo pipefail
A=$1; B=$2; N=${N:-3}
cd "$(dirname "$0")/.."
. scripts/ensure-postgres.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/walden-target}"
. bench/lib.sh
export WALDEN_SOURCE__URL="postgres://postgres@127.0.0.1:$PORT/postgres?application_name=walden"
export WALDEN_SOURCE__SLOT=walden WALDEN_SOURCE__PUBLICATION=bench WALDEN_WAREHOUSE__URL="$W/wh"
export WALDEN_SPILL__DIR="$W/spill" RUST_LOG=walden::pipeline=info
"${PSQL[@]}" -c "CREATE TABLE bench (id bigint PRIMARY KEY, account int NOT NULL, label text, amount numeric(12,2), at timestamptz); CREATE PUBLICATION bench FOR TABLE bench;" >/dev/null
"$A" run --once >/dev/null 2>&1
"${PSQL[@]}" -c "INSERT INTO bench SELECT g, g % 1000, 'label-' || g, (g % 100000) / 100.0, '2024-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, 5000000) g" >/dev/null
"$A" run --once >/dev/null 2>&1
"${PSQL[@]}" -c "SELECT pg_copy_logical_replication_slot('walden', 'base')" >/dev/null
"${PSQL[@]}" -c "UPDATE bench SET amount = amount + 1, label = label || '+' WHERE id <= 1000000" >/dev/null
cp -a "$W/wh" "$W/wh.base"
for i in $(seq 1 "$N"); do
  for bin in A B; do
    exe=$A; [ $bin = B ] && exe=$B
    rm -rf "$W/wh" "$W/spill"; cp -a "$W/wh.base" "$W/wh"
    "${PSQL[@]}" -c "SELECT pg_drop_replication_slot('walden')" >/dev/null
    "${PSQL[@]}" -c "SELECT pg_copy_logical_replication_slot('base', 'walden')" >/dev/null
    t0=$(date +%s.%N)
    "$exe" run --once 2>"$W/log" >/dev/null
    t1=$(date +%s.%N)
    start=$(grep -m1 "applying it in parts" "$W/log" | cut -c1-27)
    s0=$(date -d "$start" +%s.%N)
    echo "$bin run=$(echo "$t1 - $t0" | bc) apply=$(echo "$t1 - $s0" | bc)"
  done
done
