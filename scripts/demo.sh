#!/usr/bin/env bash
# Quickstart: runs walden end to end on embedded defaults.
# Installs PostgreSQL if missing, starts a throwaway cluster with wal_level=logical, makes sample data
# and changes, replicates them into ./walden-demo/warehouse (Delta tables), and shows what landed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-postgres.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/walden-target}"

echo "==> building walden"
cargo build --locked --quiet
WALDEN="$CARGO_TARGET_DIR/debug/walden"

DEMO="$PWD/walden-demo"
rm -rf "$DEMO"
mkdir -p "$DEMO"
RUN_AS=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$DEMO"
  RUN_AS=(runuser -u postgres --)
fi
PORT=54329
while (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do PORT=$((PORT + 1)); done

echo "==> starting a throwaway PostgreSQL on port $PORT"
"${RUN_AS[@]}" "$PG_BIN/initdb" -D "$DEMO/pg" -U postgres -A trust -E UTF8 --no-sync >/dev/null
"${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$DEMO/pg" -l "$DEMO/pg.log" -w \
  -o "-p $PORT -k $DEMO -c listen_addresses=127.0.0.1 -c wal_level=logical" start >/dev/null
trap '"${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$DEMO/pg" -m fast stop >/dev/null 2>&1 || true' EXIT
PSQL=(psql -q -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres)

cat >"$DEMO/walden.toml" <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PORT/postgres"
slot = "walden_demo"
publication = "walden"
create_publication = true

[warehouse]
url = "$DEMO/warehouse"

[batch]
max_rows = 100000
max_delay_ms = 1000
TOML

"${PSQL[@]}" <<'SQL'
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text, created timestamptz DEFAULT now());
CREATE TABLE orders (id bigserial PRIMARY KEY, customer int REFERENCES customers, amount numeric(10,2), status text);
INSERT INTO customers (id, name, email) SELECT g, 'customer ' || g, 'c' || g || '@example.com' FROM generate_series(1, 1000) g;
SQL

echo "==> walden check (preflight)"
"$WALDEN" check --config "$DEMO/walden.toml" || true

echo "==> walden run --once (creates the slot and publication, snapshots the existing rows)"
"$WALDEN" run --once --config "$DEMO/walden.toml"

echo "==> writing sample data and changes"
"${PSQL[@]}" <<'SQL'
INSERT INTO orders (customer, amount, status) SELECT 1 + g % 1000, (g % 500) + 0.99, 'new' FROM generate_series(1, 5000) g;
UPDATE orders SET status = 'shipped' WHERE id % 3 = 0;
BEGIN; DELETE FROM orders WHERE customer > 995; DELETE FROM customers WHERE id > 995; COMMIT;
BEGIN; UPDATE customers SET email = NULL WHERE id <= 10; DELETE FROM orders WHERE customer <= 10; COMMIT;
BEGIN; INSERT INTO customers VALUES (5000, 'never committed'); ROLLBACK;
SQL

echo "==> walden run --once (replicates everything committed)"
"$WALDEN" run --once --config "$DEMO/walden.toml"

echo "==> what landed in $DEMO/warehouse"
"$WALDEN" tables --config "$DEMO/walden.toml" --rows 3
echo "source:    customers=$("${PSQL[@]}" -tAc 'SELECT count(*) FROM customers') orders=$("${PSQL[@]}" -tAc 'SELECT count(*) FROM orders')"
echo "==> walden verify (source vs mirror: row counts and checksums)"
"$WALDEN" verify --config "$DEMO/walden.toml"
echo "Delta tables (readable by Spark, Trino, DuckDB, Polars): $DEMO/warehouse/{mirror,changes}/public/*"
