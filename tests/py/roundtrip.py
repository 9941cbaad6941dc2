"""Reads a walden mirror with independent readers and compares it, cell by cell, with Postgres.

    roundtrip.py DSN WAREHOUSE SCHEMA TABLE KEY [STORAGE_OPTIONS_JSON]

The mirror is read with the `deltalake` package into pyarrow; the source with psycopg. Columns
walden maps to a native Arrow type are compared as values (floats bit for bit in their width, NaN
equal to NaN); columns it keeps as text are compared with Postgres's own text output. A value the
mirror's type cannot hold must be NULL there with its exact text in `_walden_unrepresentable`.
Exit status 1 and a report on the first differences when anything differs.
"""
import json
import math
import struct
import sys
from decimal import Decimal

import deltalake
from delta_read import read_table
import psycopg
import pyarrow as pa


def same(kind, pg, mirror):
    if pg is None or mirror is None:
        return pg is None and mirror is None
    if pa.types.is_float32(kind):
        f = struct.unpack("f", struct.pack("f", pg))[0]
        return (math.isnan(f) and math.isnan(mirror)) or f == mirror
    if pa.types.is_floating(kind):
        return (math.isnan(pg) and math.isnan(mirror)) or pg == mirror
    if pa.types.is_decimal(kind):
        return Decimal(pg) == mirror
    if pa.types.is_list(kind):
        return len(pg) == len(mirror) and all(same(kind.value_type, a, b) for a, b in zip(pg, mirror))
    return pg == mirror


def innermost(kind):
    while pa.types.is_list(kind):
        kind = kind.value_type
    return kind


def main():
    dsn, warehouse, schema, table, key = sys.argv[1:6]
    options = json.loads(sys.argv[6]) if len(sys.argv) > 6 else None
    uri = f"{warehouse.rstrip('/')}/mirror/{schema}/{table}"
    mirror = read_table(uri, storage_options=options)
    fields = [f for f in mirror.schema if not f.name.startswith("_walden_")]
    with psycopg.connect(dsn) as conn:
        # Arrays of domains: psycopg reads them as text; read them as arrays of the base type.
        base = dict(conn.execute(
            "SELECT a.attname, format_type(CASE WHEN e.typtype = 'd' THEN e.typbasetype ELSE e.oid END, "
            "CASE WHEN e.typtype = 'd' THEN e.typtypmod ELSE a.atttypmod END) "
            "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid JOIN pg_type e ON e.oid = t.typelem "
            "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND t.typcategory = 'A'",
            (f'"{schema}"."{table}"',)).fetchall())
    cols = []
    for f in fields:
        q = f'"{f.name}"'
        if pa.types.is_string(f.type):
            cols.append(f"format('%s', {q})")
        elif pa.types.is_list(f.type) and pa.types.is_string(innermost(f.type)):
            cols.append(f"{q}::text[]")  # enum, interval … arrays: elements as text
        elif pa.types.is_list(f.type):
            cols.append(f"{q}::{base[f.name]}[]")
        else:
            cols.append(q)
    # Each column's exact text too, for values the mirror could not hold.
    texts = [f"format('%s', \"{f.name}\")" for f in fields]
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'; SET IntervalStyle = iso_8601; SET DateStyle = 'ISO, YMD'; "
                     "SET extra_float_digits = 3; SET bytea_output = hex")
        # format('%s', NULL) is '', not NULL: keep NULLs NULL.
        sel = ", ".join(
            f'CASE WHEN "{f.name}" IS NULL THEN NULL ELSE {c} END' for f, c in zip(fields + fields, cols + texts)
        )
        rows = conn.execute(f'SELECT {sel} FROM "{schema}"."{table}" ORDER BY "{key}"').fetchall()
    by_key = {}
    m = mirror.to_pylist()
    for r in m:
        by_key[r[key]] = r
    bad = []
    key_at = [f.name for f in fields].index(key)
    for row in rows:
        mr = by_key.pop(row[key_at], None)
        if mr is None:
            bad.append(f"{key}={row[key_at]}: missing from the mirror")
            continue
        exact = json.loads(mr["_walden_unrepresentable"]) if mr.get("_walden_unrepresentable") else {}
        for f, pg, text in zip(fields, row, row[len(fields):]):
            got = mr[f.name]
            if got is None and f.name in exact:
                ok = text == exact[f.name]
            else:
                ok = same(f.type, pg, got)
            if not ok:
                bad.append(f"{key}={row[key_at]} {f.name} ({f.type}): postgres {pg!r}, mirror {got!r}")
    bad += [f"{key}={k}: only in the mirror" for k in by_key]
    print(f"compared {len(rows)} rows x {len(fields)} columns with deltalake {deltalake.__version__}, "
          f"pyarrow {pa.__version__}, psycopg {psycopg.__version__}: {len(bad)} differences")
    for b in bad[:20]:
        print("  " + b)
    sys.exit(1 if bad else 0)


main()
