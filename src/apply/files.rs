//! Data files of a Delta table written ahead of their commit, and the commit that adds them.
//!
//! Used where one set of values goes to both tables of a source table (snapshot chunks,
//! insert-only stream batches): the changelog's files are written once by the Delta writer (which
//! computes their statistics), and the mirror gets files projected from them, column chunks
//! copied without re-encoding ([`project_columns`]).

use deltalake::kernel::Add;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError, Path};
use object_store::ObjectStoreExt;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;

use crate::sink::project::{project_columns, project_stats};
use crate::sink::SinkError;

/// Writes `batch` as data files of `table`, not committed; returns their add actions.
pub async fn write_files(
    table: &DeltaTable,
    batch: RecordBatch,
    props: WriterProperties,
) -> Result<Vec<Add>, DeltaTableError> {
    let mut w = RecordBatchWriter::for_table(table)?.with_writer_properties(props);
    w.write(batch).await?;
    w.flush().await
}

/// Reads one data file of `table` (`path` relative to the table) whole.
pub async fn read_file(table: &DeltaTable, path: &Path) -> Result<Vec<RecordBatch>, SinkError> {
    let parquet = |source| SinkError::Parquet {
        file: format!("{}{}", table.table_url(), path),
        source,
    };
    let bytes = table.object_store().get(path).await?.bytes().await?;
    ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(parquet)?
        .build()
        .map_err(parquet)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parquet(e.into()))
}

/// Files in `to` holding the columns of `schema` (`to`'s) taken from the files `adds` of `from`
/// (same names, same rows), with their add actions (statistics restricted to those columns).
pub async fn project_files(
    from: &DeltaTable,
    to: &DeltaTable,
    adds: &[Add],
    schema: &Schema,
) -> Result<Vec<Add>, SinkError> {
    let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let columns = &columns[..];
    let (from_store, to_store) = (from.object_store(), to.object_store());
    let mut out = Vec::with_capacity(adds.len());
    for add in adds {
        let path = Path::from(add.path.as_str());
        let source = from_store.get(&path).await?.bytes().await?;
        let projected = project_columns(&source, columns).map_err(|source| SinkError::Parquet {
            file: format!("{}/{}", from.table_url(), add.path),
            source,
        })?;
        let size = projected.len() as i64;
        to_store.put(&path, projected.into()).await?;
        let stats = add
            .stats
            .as_deref()
            .map(|s| project_stats(s, columns))
            .transpose()
            .map_err(|e| SinkError::Stats {
                file: add.path.clone(),
                reason: e.to_string(),
            })?;
        out.push(Add {
            size,
            stats,
            ..add.clone()
        });
    }
    Ok(out)
}
