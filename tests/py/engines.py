"""Reads a walden mirror and changelog with independent engines and compares them with Postgres.

    engines.py DSN WAREHOUSE TABLE

Engines: the `deltalake` package (into pyarrow), Polars (`read_delta`), Daft (`read_deltalake`),
and DuckDB over the Parquet files the Delta table lists (its `delta` extension cannot be
downloaded here). Each must see exactly the source's rows in the mirror (values normalised to
text: numerics as Postgres prints them, timestamps as UTC ISO-8601), and the same changes per
operation in the changelog. Prints one line per engine; exit status 1 on any difference.

A mirror with deletion vectors (walden's default) is read by `deltalake` and Polars; Daft 0.7
refuses it (it must say so: a Daft that reads it silently without the vectors would be wrong),
and DuckDB is skipped there (bare Parquet files know nothing of deletion vectors).
"""
import sys
from datetime import timezone

import daft
import deltalake
from delta_read import has_deletion_vectors, read_table
import duckdb
import polars as pl
import psycopg

dsn, warehouse, table = sys.argv[1:4]
COLUMNS = ["id", "name", "amount", "at", "flag", "tags"]
QUOTED = ", ".join('"' + c + '"' for c in COLUMNS)


def norm(row):
    out = []
    for v in row:
        if v is None:
            out.append(None)
        elif hasattr(v, "astimezone") and v.tzinfo is not None:
            out.append(v.astimezone(timezone.utc).isoformat())
        elif isinstance(v, (list, tuple)):
            out.append(repr([None if x is None else str(x) for x in v]))
        elif hasattr(v, "tolist"):
            out.append(repr([None if x is None else str(x) for x in v.tolist()]))
        else:
            out.append(str(v))
    return tuple(out)


with psycopg.connect(dsn) as conn:
    source = sorted(norm(r) for r in conn.execute(f"SELECT {', '.join(COLUMNS)} FROM {table}"))

schema, name = table.split(".")
mirror_uri = f"{warehouse}/mirror/{schema}/{name}"
changes_uri = f"{warehouse}/changes/{schema}/{name}"


def rows_of(dicts):
    return sorted(norm(tuple(d[c] for c in COLUMNS)) for d in dicts)


def op_counts(values):
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


readers = {}
vectors = has_deletion_vectors(deltalake.DeltaTable(mirror_uri))
print(f"mirror layout: {'deletion vectors' if vectors else 'copy-on-write'}")
readers["deltalake"] = (
    lambda: rows_of(read_table(mirror_uri).to_pylist()),
    lambda: op_counts(read_table(changes_uri, columns=["_walden_op"]).column("_walden_op").to_pylist()),
)
readers["polars"] = (
    lambda: rows_of(pl.read_delta(mirror_uri).to_dicts()),
    lambda: op_counts(pl.read_delta(changes_uri).get_column("_walden_op").to_list()),
)
readers["daft"] = (
    lambda: rows_of(daft.read_deltalake(mirror_uri).to_pylist()),
    lambda: op_counts(r["_walden_op"] for r in daft.read_deltalake(changes_uri).select("_walden_op").to_pylist()),
)


def duck(uri, sql):
    files = deltalake.DeltaTable(uri).file_uris()
    con = duckdb.connect()
    return con.execute(sql.replace("FILES", "read_parquet(?)"), [files])


if vectors:
    try:
        daft.read_deltalake(mirror_uri).count_rows()
        print("daft: read a mirror with deletion vectors: compare it, and update the README")
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - Daft raises a plain ValueError
        if "deletion vectors are not yet supported" not in str(e):
            raise
        print("daft: refuses deletion vectors (not yet supported)")
    del readers["daft"]
else:
    readers["duckdb"] = (
        lambda: rows_of(dict(zip(COLUMNS, r)) for r in duck(
            mirror_uri, f"SELECT {QUOTED} FROM FILES").fetchall()),
        lambda: dict(duck(changes_uri, "SELECT _walden_op, count(*) FROM FILES GROUP BY 1").fetchall()),
    )

failed = False
reference = None
for engine, (mirror, changes) in readers.items():
    got, counts = mirror(), changes()
    reference = reference or counts
    ok = got == source and counts == reference
    print(f"{engine}: mirror {len(got)} rows {'=' if got == source else '!='} source {len(source)}; "
          f"changelog {dict(sorted(counts.items()))}")
    if got != source:
        missing = [r for r in source if r not in got][:3]
        extra = [r for r in got if r not in source][:3]
        print(f"  only in the source: {missing}\n  only in {engine}: {extra}")
    failed |= not ok
sys.exit(1 if failed else 0)
