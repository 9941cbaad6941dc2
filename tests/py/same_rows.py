"""Compares mirrors with their source tables, as multisets of rows, through two readers.

    same_rows.py DSN WAREHOUSE TABLE [TABLE ...]

Readers: the `deltalake` package (deletion vectors applied by its DataFusion scan, see
delta_read.py) and Polars (`read_delta`). Values are compared as Python's text of them (the
test tables hold integers, text and NULLs). Prints one line per table and reader; exit status 1
on any difference.
"""
import sys
from collections import Counter

import polars as pl
import psycopg

from delta_read import read_table

dsn, warehouse, tables = sys.argv[1], sys.argv[2], sys.argv[3:]


def norm(values):
    return tuple(None if v is None else str(v) for v in values)


failed = False
with psycopg.connect(dsn) as conn:
    for table in tables:
        cur = conn.execute(f"SELECT * FROM {table}")
        columns = [d.name for d in cur.description]
        source = Counter(norm(r) for r in cur.fetchall())
        uri = f"{warehouse}/mirror/public/{table}"
        readers = {
            "deltalake": lambda: read_table(uri, columns=columns).to_pylist(),
            "polars": lambda: pl.read_delta(uri).select(columns).to_dicts(),
        }
        for name, read in readers.items():
            got = Counter(norm(d[c] for c in columns) for d in read())
            same = got == source
            print(f"{table} {name}: {sum(got.values())} rows {'=' if same else '!='} "
                  f"source {sum(source.values())}")
            if not same:
                print(f"  only in the source: {list((source - got).items())[:3]}")
                print(f"  only in {name}: {list((got - source).items())[:3]}")
                failed = True
sys.exit(1 if failed else 0)
