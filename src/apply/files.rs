//! Data files of a Delta table written ahead of their commit, and the commit that adds them.
//!
//! Used where one set of values goes to both tables of a source table (snapshot chunks,
//! insert-only stream batches, batches whose changelog rows are the mirror plan's new rows): the
//! changelog's files are written once by the Delta writer (which
//! computes their statistics), and the mirror gets files projected from them, column chunks
//! copied without re-encoding ([`project_columns`]).

use deltalake::kernel::{Add, LogicalFileView};
use deltalake::parquet::arrow::arrow_reader::RowSelection;
// `ParquetObjectReader` is deprecated in parquet 59 in favour of one's own `AsyncFileReader`;
// it is what deltalake itself reads with in this version, so walden uses it too until both move.
#[allow(deprecated)]
use deltalake::parquet::arrow::async_reader::ParquetObjectReader;
use deltalake::parquet::arrow::async_reader::{
    ParquetRecordBatchStream, ParquetRecordBatchStreamBuilder,
};
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError, Path};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use roaring::RoaringTreemap;

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
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

/// Reads rows of one data file of `table` as it is stored (rows its deletion vector marks
/// included): the columns named (those the file has; all when `None`), the rows at `positions`
/// (ascending; all when `None`). Only the byte ranges of those columns are fetched.
pub async fn read_rows(
    table: &DeltaTable,
    file: &LogicalFileView,
    columns: Option<&[&str]>,
    positions: Option<&[u64]>,
) -> Result<Vec<RecordBatch>, SinkError> {
    let parquet = |source| SinkError::Parquet {
        file: format!("{}{}", table.table_url(), file.path()),
        source,
    };
    rows(table, file, columns, positions)
        .await?
        .try_collect()
        .await
        .map_err(parquet)
}

/// All rows of one data file of `table` as it is stored, a batch at a time (in file order): the
/// columns named (those the file has; all when `None`).
pub async fn stream_rows(
    table: &DeltaTable,
    file: &LogicalFileView,
    columns: Option<&[&str]>,
) -> Result<Rows, SinkError> {
    rows(table, file, columns, None).await
}

/// The batches of one data file, read as they are needed.
#[allow(deprecated)]
pub type Rows = ParquetRecordBatchStream<ParquetObjectReader>;

async fn rows(
    table: &DeltaTable,
    file: &LogicalFileView,
    columns: Option<&[&str]>,
    positions: Option<&[u64]>,
) -> Result<Rows, SinkError> {
    let path = file.object_store_path();
    let parquet = |source| SinkError::Parquet {
        file: format!("{}{}", table.table_url(), path),
        source,
    };
    #[allow(deprecated)]
    let reader = ParquetObjectReader::new(table.object_store(), path.clone())
        .with_file_size(file.size().max(0) as u64);
    let mut builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(parquet)?;
    if let Some(columns) = columns {
        let schema = builder.parquet_schema();
        let roots: Vec<usize> = (0..schema.root_schema().get_fields().len())
            .filter(|&i| columns.contains(&schema.root_schema().get_fields()[i].name()))
            .collect();
        let mask = ProjectionMask::roots(schema, roots);
        builder = builder.with_projection(mask);
    }
    if let Some(positions) = positions {
        let total = builder.metadata().file_metadata().num_rows().max(0) as usize;
        let ranges = positions.iter().map(|&p| p as usize..p as usize + 1);
        builder = builder.with_row_selection(RowSelection::from_consecutive_ranges(ranges, total));
    }
    builder.build().map_err(parquet)
}

/// The rows `file` of `table` holds: its stored rows less those its deletion vector marks.
pub async fn read_live(
    table: &DeltaTable,
    file: &LogicalFileView,
) -> Result<Vec<RecordBatch>, SinkError> {
    let batches = read_rows(table, file, None, None).await?;
    if file.deletion_vector_descriptor().is_none() {
        return Ok(batches);
    }
    let marked: Vec<u64> = deleted_rows(table, file).await?.iter().collect();
    let mut at = 0u64;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let keep = BooleanArray::from(live_rows(&marked, at, b.num_rows()));
        at += b.num_rows() as u64;
        out.push(
            filter_record_batch(&b, &keep).map_err(|e| SinkError::Parquet {
                file: format!("{}{}", table.table_url(), file.path()),
                source: e.into(),
            })?,
        );
    }
    Ok(out)
}

/// The positions `file`'s deletion vector marks (empty without one).
pub async fn deleted_rows(
    table: &DeltaTable,
    file: &LogicalFileView,
) -> Result<RoaringTreemap, SinkError> {
    match file.deletion_vector_descriptor() {
        Some(d) => crate::sink::dv::read(table, &d).await,
        None => Ok(RoaringTreemap::new()),
    }
}

/// Which of the `n` rows from position `at` on are live, given the positions a vector marks
/// (ascending). One pass over the batch's share of the vector, not a lookup per row.
pub fn live_rows(marked: &[u64], at: u64, n: usize) -> Vec<bool> {
    let mut live = vec![true; n];
    let from = marked.partition_point(|&p| p < at);
    for &p in marked[from..].iter().take_while(|&&p| p < at + n as u64) {
        live[(p - at) as usize] = false;
    }
    live
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

#[cfg(test)]
mod tests {
    use super::live_rows;

    #[test]
    fn live_rows_are_those_the_vector_does_not_mark() {
        let marked = [0, 3, 4, 9, 10, 25];
        assert_eq!(live_rows(&marked, 0, 5), [false, true, true, false, false]);
        assert_eq!(
            live_rows(&marked, 5, 6),
            [true, true, true, true, false, false]
        );
        assert_eq!(live_rows(&marked, 11, 3), [true, true, true]);
        assert_eq!(live_rows(&[], 7, 2), [true, true]);
    }
}
