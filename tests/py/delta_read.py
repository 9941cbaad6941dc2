"""Reading a Delta table into pyarrow with the `deltalake` package, deletion vectors applied.

deltalake 1.6's `to_pyarrow_table` refuses tables with the `deletionVectors` reader feature;
its DataFusion-backed `QueryBuilder` reads them (and applies the vectors). The query's types
(string views) are cast back to the table's own schema, so callers see the same types either way.
"""
import deltalake
import pyarrow as pa
from deltalake import QueryBuilder


def has_deletion_vectors(dt):
    return "deletionVectors" in (dt.protocol().reader_features or [])


def read_table(uri, storage_options=None, columns=None):
    dt = deltalake.DeltaTable(uri, storage_options=storage_options)
    if not has_deletion_vectors(dt):
        return dt.to_pyarrow_table(columns=columns)
    schema = pa.schema(dt.schema().to_arrow())
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    select = ", ".join('"' + f.name + '"' for f in schema)
    got = pa.table(QueryBuilder().register("t", dt).execute(f"SELECT {select} FROM t"))
    return got.cast(schema)
