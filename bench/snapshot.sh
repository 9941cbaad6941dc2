#!/usr/bin/env bash
# Snapshot throughput: a table of ROWS rows (5,000,000 by default) is copied by walden's initial
# snapshot (`walden run --once` creating its slot: exported snapshot, parallel ctid-range COPY,
# Parquet into the changelog and mirror Delta tables), against a raw
# `COPY bench TO STDOUT (FORMAT binary)` of the same table into /dev/null, in the same run.
# Records both rates, their ratio and walden's peak RSS; ROUNDS rounds, medians.
#
#   bench/snapshot.sh          # ROWS=5000000 ROUNDS=3 PARALLELISM=2
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-postgres.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/walden-target}"
ROWS="${ROWS:-5000000}"
ROUNDS="${ROUNDS:-3}"
PARALLELISM="${PARALLELISM:-2}"
. bench/lib.sh

"${PSQL[@]}" <<SQL >/dev/null
CREATE TABLE bench (id bigint PRIMARY KEY, account int NOT NULL, label text, amount numeric(12,2), at timestamptz);
INSERT INTO bench SELECT g, g % 1000, 'label-' || g, (g % 100000) / 100.0, '2024-01-01'::timestamptz + g * interval '1 second'
  FROM generate_series(1, $ROWS) g;
VACUUM ANALYZE bench;
CREATE PUBLICATION bench FOR TABLE bench;
SQL

results=()
for round in $(seq 1 "$ROUNDS"); do
  t0=$(date +%s.%N)
  "${PSQL[@]}" -c "COPY bench TO STDOUT (FORMAT binary)" >/dev/null
  t1=$(date +%s.%N)
  copy_s=$(echo "$t1 - $t0" | bc)

  rm -rf "$W/wh"
  "${PSQL[@]}" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots" >/dev/null
  t0=$(date +%s.%N)
  WALDEN_SOURCE__URL="postgres://postgres@127.0.0.1:$PORT/postgres" WALDEN_SOURCE__SLOT=walden \
  WALDEN_SOURCE__PUBLICATION=bench WALDEN_WAREHOUSE__URL="$W/wh" WALDEN_SNAPSHOT__PARALLELISM="$PARALLELISM" \
  RUST_LOG=warn /usr/bin/time -f "%M %U %S" -o "$W/rss" ${BENCH_WALDEN_PREFIX:-} "$WALDEN" run --once
  t1=$(date +%s.%N)
  walden_s=$(echo "$t1 - $t0" | bc)
  # Not a null sink: the mirror and the changelog must hold every row.
  counts=$(WALDEN_SOURCE__URL="postgres://postgres@127.0.0.1:$PORT/postgres" WALDEN_WAREHOUSE__URL="$W/wh" \
    "$WALDEN" query --format csv "SELECT (SELECT count(*) FROM public.bench) AS m, (SELECT count(*) FROM changes.public.bench) AS c" | tail -1)
  [ "$counts" = "$ROWS,$ROWS" ] || { echo "warehouse holds $counts rows (mirror,changelog), expected $ROWS" >&2; exit 1; }

  copy_rate=$(echo "$ROWS / $copy_s" | bc)
  walden_rate=$(echo "$ROWS / $walden_s" | bc)
  ratio=$(echo "scale=3; $walden_rate / $copy_rate" | bc)
  read -r rss_kib w_user w_sys <"$W/rss"
  line="$round $copy_s $walden_s $copy_rate $walden_rate $ratio $(( rss_kib / 1024 )) $(echo "$w_user + $w_sys" | bc)"
  echo "round $line" >&2
  results+=("$line")
done

col() { printf '%s\n' "${results[@]}" | awk -v c="$1" '{print $c}' | median; }
cat <<MD
| machine | $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r), PostgreSQL $("${PSQL[@]}" -c 'SHOW server_version') |
|---|---|
| rows | $ROWS, parallelism $PARALLELISM, rounds $ROUNDS (medians) |
| COPY (FORMAT binary) → /dev/null | $(col 2) s, $(col 4) rows/s |
| walden snapshot → Delta (changelog + mirror) | $(col 3) s, $(col 5) rows/s |
| ratio walden / raw COPY | $(col 6) |
| walden peak RSS | $(col 7) MiB |
| walden process CPU (user+sys) | $(col 8) s |
MD
