#!/usr/bin/env bash
# The cost of erasing one data subject (issue 12): a warehouse of 10,000,000 order rows in two
# layouts, 5,000,000 each: `orders_scattered` (the subject's 50 orders spread over the whole
# table, as random keys put them) and `orders_clustered` (its 50 orders next to each other), plus
# 100,000 customers. Customer 42 is deleted at the source and streamed (deletes not propagated),
# then `walden forget --subject customer=42` is timed; the receipt says how many files each table
# rewrote, and the sizes of the files it deleted are the bytes rewritten. verify-erasure must
# then find nothing. Prints one line per table and the totals, then the time of propagated-delete
# rounds.
#
#   bench/erase.sh        # CUSTOMERS=100000 ORDERS=5000000 (per layout)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-postgres.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/walden-target}"
CUSTOMERS="${CUSTOMERS:-100000}"
ORDERS="${ORDERS:-5000000}"
. bench/lib.sh
command -v jq >/dev/null || apt-get install -y -qq jq >/dev/null

export WALDEN_SOURCE__URL="postgres://postgres@127.0.0.1:$PORT/postgres"
export WALDEN_SOURCE__PUBLICATION=bench WALDEN_SOURCE__CREATE_PUBLICATION=false
export WALDEN_WAREHOUSE__URL="$W/wh" WALDEN_SPILL__DIR="$W/spill" RUST_LOG=warn
export WALDEN_PRIVACY__KEY="bench-secret" WALDEN_PRIVACY__PROPAGATE_DELETES=false
cat > "$W/walden.toml" <<'TOML'
[privacy.subjects.customer]
"public.customers" = "id"
"public.orders_scattered" = "customer_id"
"public.orders_clustered" = "customer_id"
TOML
WALDEN=("$WALDEN")
walden() { "${WALDEN[0]}" "$1" --config "$W/walden.toml" "${@:2}"; }

per=$((ORDERS / CUSTOMERS))
"${PSQL[@]}" <<SQL >/dev/null
CREATE TABLE customers (id int PRIMARY KEY, email text, name text);
INSERT INTO customers SELECT g, 'customer' || g || '@example.com', 'name ' || g FROM generate_series(1, $CUSTOMERS) g;
CREATE TABLE orders_scattered (id bigint PRIMARY KEY, customer_id int, item text, amount numeric(10,2));
INSERT INTO orders_scattered SELECT g, g % $CUSTOMERS + 1, 'item ' || g, (g % 1000) / 10.0 FROM generate_series(1, $ORDERS) g;
CREATE TABLE orders_clustered (id bigint PRIMARY KEY, customer_id int, item text, amount numeric(10,2));
INSERT INTO orders_clustered SELECT g, (g - 1) / $per + 1, 'item ' || g, (g % 1000) / 10.0 FROM generate_series(1, $ORDERS) g;
CREATE PUBLICATION bench FOR TABLE customers, orders_scattered, orders_clustered;
SQL
echo "==> snapshot of $((CUSTOMERS + 2 * ORDERS)) rows" >&2
t0=$(date +%s.%N); walden run --once; t1=$(date +%s.%N)
echo "snapshot $(echo "$t1 - $t0" | bc) s" >&2
"${PSQL[@]}" -c "DELETE FROM orders_scattered WHERE customer_id = 42; DELETE FROM orders_clustered WHERE customer_id = 42; DELETE FROM customers WHERE id = 42;" >/dev/null
RUST_LOG=walden=info walden run --once 2>&1 | grep -v "^$" | cut -c1-250 >&2

walden query "SELECT _walden_op, count(*) FROM changes.public.customers WHERE id = 42 GROUP BY 1" --format csv >&2
# Sizes of every file before, to count the bytes the erasure rewrote.
(cd "$W/wh" && find . -type f -printf '%P %s\n') > "$W/sizes"
wh_before=$(du -sb "$W/wh" | cut -f1)
t0=$(date +%s.%N)
/usr/bin/time -f "%M" -o "$W/rss" "${WALDEN[0]}" forget --config "$W/walden.toml" --subject customer=42 --json > "$W/receipt.json"
t1=$(date +%s.%N)
secs=$(echo "$t1 - $t0" | bc)
walden verify-erasure --subject customer=42 >/dev/null || { echo "verify-erasure still finds the subject" >&2; exit 1; }

bytes_of() { awk 'NR==FNR {size[$1]=$2; next} {s += size[$1]} END {print s + 0}' "$W/sizes" -; }
echo "| table | kind | rows erased | files rewritten | files deleted | bytes of files deleted |"
echo "|---|---|---|---|---|---|"
total=0
while read -r row; do
  table=$(jq -r .table <<<"$row"); kind=$(jq -r .kind <<<"$row")
  bytes=$(jq -r '.files_deleted[]' <<<"$row" | bytes_of)
  total=$((total + bytes))
  echo "| $table | $kind | $(jq -r .rows_removed <<<"$row") | $(jq -r '.files_rewritten | length' <<<"$row") | $(jq -r '.files_deleted | length' <<<"$row") | $bytes |"
done < <(jq -c '.tables[]' "$W/receipt.json")
echo
echo "| machine | $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r), $("${PSQL[@]}" -c 'SHOW server_version') |"
echo "| warehouse before | $wh_before bytes |"
echo "| forget | $secs s, peak RSS $(( $(cat "$W/rss") / 1024 )) MiB, $total bytes of data files rewritten (deleted and written anew without the subject) |"

# Propagated-delete rounds on the same warehouse. Streamed changes first, so the changelogs also
# hold files that mix updates and deletes: 500,000 updates and 5,000 deletes of scattered
# orders. Then `walden run --once` with nothing to stream, without propagation (the run's own
# cost), and with it twice: the first round erases the histories of the 100 orders deleted with
# customer 42 (`forget` takes the subject's rows; the orders' delete rows carry only their keys,
# so they make those rows due on their own) and of the 5,000; the next one finds nothing left.
"${PSQL[@]}" -c "UPDATE orders_scattered SET item = item || '+' WHERE id % 10 = 0; DELETE FROM orders_scattered WHERE id % 1000 = 1;" >/dev/null
walden run --once >/dev/null
timed_run() { local t0 t1; t0=$(date +%s.%N); walden run --once >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
plain=$(timed_run)
export WALDEN_PRIVACY__PROPAGATE_DELETES=true
first=$(timed_run)
next=$(timed_run)
left=$(walden query "SELECT count(*) FROM changes.public.orders_scattered WHERE _walden_op = 'delete'" --format csv | tail -1)
[ "$left" = 0 ] || { echo "$left delete rows left after a round" >&2; exit 1; }
echo "| rounds (walden run --once, nothing to stream) | without propagation $plain s; first round (erases 5,100 deleted orders' histories) $first s; next round (nothing left) $next s |"
