#!/usr/bin/env bash
# Steady state: a mirror of SCALE × 100,000 rows (pgbench_accounts) under `pgbench -N` at RATE
# transactions/s for DURATION seconds while `walden run` streams with its defaults (maintenance on).
# Records the achieved rate, freshness p50/p99 (walden_commit_to_visible_seconds: source commit →
# Delta commit), bytes walden wrote to disk per change (/proc/PID/io, spill included), the
# warehouse's size and file count at the end against the same tables compacted, and walden's peak
# RSS. Not part of CI (minutes of load; needs a release build).
#
#   bench/steady.sh                    # SCALE=100 (10M rows) RATE=2000 DURATION=300
#   SCALE=10 RATE=1000 DURATION=60 bench/steady.sh
#   WALDEN_LOG=walden=info KEEP_LOG=/tmp/walden.log bench/steady.sh   # keep walden's log
#   DURATION=3600 SAMPLE_S=300 bench/steady.sh   # each table's size and files every 5 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-postgres.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/walden-target}"
SCALE="${SCALE:-100}"
RATE="${RATE:-2000}"
DURATION="${DURATION:-300}"
. bench/lib.sh
command -v curl >/dev/null || apt-get install -y -qq curl >/dev/null
PGBENCH=("$PG_BIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres)

echo "==> pgbench -i -s $SCALE" >&2
"${PGBENCH[@]}" -i -q -s "$SCALE" postgres >/dev/null 2>&1
"${PSQL[@]}" -c "CREATE PUBLICATION bench FOR TABLE pgbench_accounts, pgbench_history" >/dev/null

MPORT=$((PORT + 1000))
while (echo >"/dev/tcp/127.0.0.1/$MPORT") 2>/dev/null; do MPORT=$((MPORT + 1)); done
scrape() { curl -s "http://127.0.0.1:$MPORT/metrics"; }
metric() { scrape | awk -v m="$1" '$1 == m {print $2}'; }

echo "==> walden run (snapshot of $((SCALE * 100000)) rows, then streaming)" >&2
WALDEN_SOURCE__URL="postgres://postgres@127.0.0.1:$PORT/postgres" WALDEN_SOURCE__SLOT=walden \
WALDEN_SOURCE__PUBLICATION=bench WALDEN_WAREHOUSE__URL="$W/wh" \
WALDEN_METRICS__LISTEN="127.0.0.1:$MPORT" RUST_LOG="${WALDEN_LOG:-walden=warn}" \
  "$WALDEN" run 2>"$W/walden.log" &
WPID=$!
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$MPORT/readyz")" = 200 ] &&
      [ "$(metric walden_snapshot_tables_remaining)" = 0 ] &&
      [ -n "$(metric walden_confirmed_lsn)" ]; do
  kill -0 $WPID || { cat "$W/walden.log"; exit 1; }
  sleep 1
done
sleep 5
du_wh() { du -sb "$W/wh" | cut -f1; }
files_wh() { find "$W/wh" -name '*.parquet' | wc -l; }
size0=$(du_wh)
written0=$(awk '/^write_bytes/ {print $2}' "/proc/$WPID/io")
changes0=$(metric walden_changes_total)
scrape >"$W/m0"

# Each table's bytes and Parquet files on disk (committed or not, removed files within the
# retention included) and the bytes of its deletion-vector files, and walden's RSS, every
# SAMPLE_S seconds of the load.
if [ -n "${SAMPLE_S:-}" ]; then
  (
    t0=$(date +%s)
    while kill -0 $WPID 2>/dev/null; do
      t=$(( $(date +%s) - t0 ))
      for d in $(find "$W/wh" -mindepth 3 -maxdepth 3 -type d | sort); do
        dv=$(find "$d" -name 'deletion_vector_*.bin' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
        echo "$t ${d#"$W"/wh/} $(du -sb "$d" | cut -f1) $(find "$d" -name '*.parquet' | wc -l) $dv"
      done
      echo "$t rss_kib $(awk '/VmRSS/ {print $2}' "/proc/$WPID/status" 2>/dev/null || echo 0) 0"
      sleep "$SAMPLE_S"
    done
  ) >"$W/sizes" &
fi

echo "==> pgbench -N -R $RATE for $DURATION s" >&2
"${PGBENCH[@]}" -N -R "$RATE" -T "$DURATION" -c 8 -j 2 postgres >"$W/pgbench.out" 2>&1
# Until walden has applied everything the run committed.
end=$("${PSQL[@]}" -c "SELECT pg_current_wal_lsn() - '0/0'")
while [ "$(metric walden_confirmed_lsn)" -lt "$end" ]; do sleep 1; done
scrape >"$W/m1"
written=$(( $(awk '/^write_bytes/ {print $2}' "/proc/$WPID/io") - written0 ))
changes=$(( $(metric walden_changes_total) - changes0 ))
rss_mib=$(( $(awk '/VmHWM/ {print $2}' "/proc/$WPID/status") / 1024 ))
size1=$(du_wh); files1=$(files_wh)
kill -TERM $WPID; wait $WPID || true

# Freshness percentiles from the histogram's buckets (counts during the run).
quantile() { # $1 = q
  join <(grep '^walden_commit_to_visible_seconds_bucket' "$W/m0" | sed 's/.*le="\([^"]*\)"} /\1 /' | sort) \
       <(grep '^walden_commit_to_visible_seconds_bucket' "$W/m1" | sed 's/.*le="\([^"]*\)"} /\1 /' | sort) |
    awk -v q="$1" '{le=$1; n=$3-$2; if (le=="+Inf") le=1e9; print le, n}' | sort -g |
    awk -v q="$1" '{le[NR]=$1; n[NR]=$2} END {t=n[NR]; for (i=1;i<=NR;i++) if (n[i] >= q*t) {print le[i]; exit}}'
}
p50=$(quantile 0.5); p99=$(quantile 0.99)
# Share of commits visible within each bucket bound.
shares=$(join <(grep '^walden_commit_to_visible_seconds_bucket' "$W/m0" | sed 's/.*le="\([^"]*\)"} /\1 /' | sort) \
              <(grep '^walden_commit_to_visible_seconds_bucket' "$W/m1" | sed 's/.*le="\([^"]*\)"} /\1 /' | sort) |
  awk '{le=$1; n=$3-$2; if (le=="+Inf") le=1e9; print le, n}' | sort -g |
  awk '{le[NR]=$1; n[NR]=$2} END {t=n[NR]; for (i=1;i<=NR;i++) if (le[i] >= 0.5 && le[i] <= 10) printf "<=%ss %.1f%%  ", le[i], 100*n[i]/t}')

echo "==> walden maintain (compacted reference)" >&2
WALDEN_SOURCE__URL=unused WALDEN_WAREHOUSE__URL="$W/wh" WALDEN_MAINTENANCE__COMPACT_MIN_FILES=2 \
WALDEN_MAINTENANCE__RETENTION_HOURS=0 WALDEN_MAINTENANCE__BUDGET_S=100000 RUST_LOG=warn \
  "$WALDEN" maintain >/dev/null
compacted=$(du_wh); files_c=$(files_wh)

# Where walden's time went during the run: count and mean of its duration histograms.
mean() { # $1 = histogram (without labels)
  local s0 c0 s1 c1
  s0=$(awk -v m="$1_sum" '$1 == m {print $2}' "$W/m0"); c0=$(awk -v m="$1_count" '$1 == m {print $2}' "$W/m0")
  s1=$(awk -v m="$1_sum" '$1 == m {print $2}' "$W/m1"); c1=$(awk -v m="$1_count" '$1 == m {print $2}' "$W/m1")
  echo "$1: $(echo "${c1:-0} - ${c0:-0}" | bc) times, mean $(echo "scale=3; (${s1:-0} - ${s0:-0}) / (${c1:-0} - ${c0:-0} + 0.000001)" | bc) s"
}
tps=$(awk '/^tps = / {print $3; exit}' "$W/pgbench.out")
echo "scale $SCALE rate $RATE seconds $DURATION"
echo "pgbench achieved tps: $tps; changes applied: $changes"
echo "freshness (commit → Delta commit) p50 <= ${p50} s, p99 <= ${p99} s (histogram bucket bounds)"
echo "freshness distribution: $shares"
echo "bytes written by walden per change: $(( written / (changes > 0 ? changes : 1) )) (write_bytes $written)"
echo "warehouse: $size0 B before the load, $size1 B after ($files1 Parquet files); compacted: $compacted B ($files_c files); ratio $(echo "scale=2; $size1 / $compacted" | bc)"
echo "walden peak RSS: $rss_mib MiB"
echo "mirror commits made again after losing a race (maintenance): $(grep -c 'executing the plan again' "$W/walden.log" || true)"
[ -z "${KEEP_LOG:-}" ] || cp "$W/walden.log" "$KEEP_LOG"
if [ -n "${SAMPLE_S:-}" ]; then
  echo "sampled every $SAMPLE_S s during the load (seconds, table, bytes on disk, Parquet files, deletion-vector bytes; rss_kib):"
  awk -v end="$DURATION" '$1 <= end + 60' "$W/sizes"
fi
mean walden_flush_duration_seconds
mean walden_merge_duration_seconds
