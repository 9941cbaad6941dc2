# Shared by the benchmarks: builds walden (release; WALDEN_BIN=path runs that binary instead, for a
# baseline in the same session), starts a throwaway cluster tuned for bulk work on a free port,
# and defines PSQL, WALDEN, W (work dir) and median(). Source it.
for tool in /usr/bin/time:time bc:bc; do command -v "${tool%%:*}" >/dev/null || apt-get install -y -qq "${tool#*:}" >/dev/null; done

if [ -n "${WALDEN_BIN:-}" ]; then
  WALDEN="$WALDEN_BIN"
else
  echo "==> building walden (release)" >&2
  cargo build --release --locked --quiet
  WALDEN="$CARGO_TARGET_DIR/release/walden"
fi

W="$(mktemp -d /tmp/walden-bench.XXXX)"
RUN_AS=()
if [ "$(id -u)" = 0 ]; then chown postgres: "$W"; RUN_AS=(runuser -u postgres --); fi
PORT=55432
while (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do PORT=$((PORT + 1)); done
"${RUN_AS[@]}" "$PG_BIN/initdb" -D "$W/pg" -U postgres -A trust -E UTF8 --no-sync >/dev/null
"${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$W/pg" -l "$W/pg.log" -w -o "-p $PORT -k $W -c listen_addresses=127.0.0.1 \
  -c wal_level=logical -c max_wal_size=4GB -c shared_buffers=512MB -c synchronous_commit=off" start >/dev/null
cleanup() { "${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$W/pg" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$W"; }
trap cleanup EXIT
PSQL=(psql -q -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -tA)


median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
