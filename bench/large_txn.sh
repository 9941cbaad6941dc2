#!/usr/bin/env bash
# Large transactions: one transaction of INSERT_ROWS inserted rows, and one of UPDATE_ROWS updates of
# rows the mirror already holds, each drained from two slots created before it: once by
# pg_recvlogical (to /dev/null) and once by `walden run --once` (into real Delta tables, with the
# default spill budget, so the transaction spills and lands in parts). Records seconds, rows/s,
# their ratio and walden's peak RSS per scenario; repeats ROUNDS times and prints medians.
#
#   bench/large_txn.sh        # INSERT_ROWS=5000000 UPDATE_ROWS=1000000 ROUNDS=3 by default
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-postgres.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/walden-target}"
INSERT_ROWS="${INSERT_ROWS:-5000000}"
UPDATE_ROWS="${UPDATE_ROWS:-1000000}"
ROUNDS="${ROUNDS:-3}"
. bench/lib.sh

walden_env() {
  export WALDEN_SOURCE__URL="postgres://postgres@127.0.0.1:$PORT/postgres?application_name=walden"
  export WALDEN_SOURCE__SLOT=walden WALDEN_SOURCE__PUBLICATION=bench WALDEN_WAREHOUSE__URL="$W/wh"
  export WALDEN_SPILL__DIR="$W/spill" RUST_LOG="${WALDEN_LOG:-warn}"
}

# Drains slot `recv` with pg_recvlogical up to the current WAL end; prints seconds.
drain_recv() {
  local end t0 t1
  end=$("${PSQL[@]}" -c "SELECT pg_current_wal_lsn()")
  t0=$(date +%s.%N)
  "$PG_BIN/pg_recvlogical" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres --slot recv --start \
    -o proto_version=2 -o streaming=on -o publication_names=bench --endpos="$end" -f /dev/null
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}

# Drains walden's slot with `walden run --once`; prints seconds and peak RSS (MiB).
drain_walden() {
  local t0 t1 rss
  t0=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "$W/rss" "$WALDEN" run --once
  t1=$(date +%s.%N)
  rss=$(( $(cat "$W/rss") / 1024 ))
  echo "$(echo "$t1 - $t0" | bc) $rss"
}

walden_env
results=()
for round in $(seq 1 "$ROUNDS"); do
  # --- one transaction of INSERT_ROWS inserts
  rm -rf "$W/wh" "$W/spill"
  "${PSQL[@]}" <<SQL >/dev/null
DROP TABLE IF EXISTS bench; DROP PUBLICATION IF EXISTS bench;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots;
CREATE TABLE bench (id bigint PRIMARY KEY, account int NOT NULL, label text, amount numeric(12,2), at timestamptz);
CREATE PUBLICATION bench FOR TABLE bench;
SQL
  # walden creates its slot and its (empty) tables before the transaction, as in production: a
  # slot made behind its back would make it copy the table (a COPY pg_recvlogical never does).
  "$WALDEN" run --once >/dev/null
  "${PSQL[@]}" <<SQL >/dev/null
SELECT pg_create_logical_replication_slot('recv', 'pgoutput');
INSERT INTO bench SELECT g, g % 1000, 'label-' || g, (g % 100000) / 100.0, '2024-01-01'::timestamptz + g * interval '1 second'
  FROM generate_series(1, $INSERT_ROWS) g;
SQL
  ins_recv=$(drain_recv)
  read -r ins_walden ins_rss <<<"$(drain_walden)"

  # --- one transaction of UPDATE_ROWS updates of rows the mirror holds
  "${PSQL[@]}" <<SQL >/dev/null
SELECT pg_drop_replication_slot('recv');
SELECT pg_create_logical_replication_slot('recv', 'pgoutput');
UPDATE bench SET amount = amount + 1, label = label || '+' WHERE id <= $UPDATE_ROWS;
SQL
  upd_recv=$(drain_recv)
  read -r upd_walden upd_rss <<<"$(drain_walden)"
  rows=$("$WALDEN" query "SELECT count(*) FROM public.bench WHERE label LIKE '%+'" --format csv | tail -1)
  [ "$rows" = "$UPDATE_ROWS" ] || { echo "mirror holds $rows updated rows, expected $UPDATE_ROWS" >&2; exit 1; }

  line="$round $ins_recv $ins_walden $(echo "scale=3; $ins_recv / $ins_walden" | bc) $ins_rss \
$upd_recv $upd_walden $(echo "scale=3; $upd_recv / $upd_walden" | bc) $upd_rss"
  echo "round $line" >&2
  results+=("$line")
done

col() { printf '%s\n' "${results[@]}" | awk -v c="$1" '{print $c}' | median; }
cat <<MD
| machine | $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r), PostgreSQL $("${PSQL[@]}" -c 'SHOW server_version') |
|---|---|
| rounds | $ROUNDS (medians) |
| $INSERT_ROWS inserts, one transaction | pg_recvlogical $(col 2) s, walden $(col 3) s, ratio $(col 4), walden peak RSS $(col 5) MiB |
| $UPDATE_ROWS updates, one transaction | pg_recvlogical $(col 6) s, walden $(col 7) s, ratio $(col 8), walden peak RSS $(col 9) MiB |
MD
