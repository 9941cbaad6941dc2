//! Column projection of a Parquet file without re-encoding.
//!
//! A snapshot writes the same values to the changelog and to the mirror: the mirror's columns are
//! a subset of the changelog's. Instead of encoding and compressing every value twice, the
//! mirror's file is assembled from the changelog file's encoded column chunks (pages, statistics
//! and page indexes copied as they are), which costs a copy of bytes, not an encode.

use std::sync::Arc;

use bytes::Bytes;
use deltalake::parquet::arrow::{encode_arrow_schema, parquet_to_arrow_schema};
use deltalake::parquet::column::writer::ColumnCloseResult;
use deltalake::parquet::errors::ParquetError;
use deltalake::parquet::file::metadata::{KeyValue, PageIndexPolicy, ParquetMetaDataReader};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::file::writer::SerializedFileWriter;
use deltalake::parquet::schema::types::Type;

const ARROW_SCHEMA_KEY: &str = "ARROW:schema";

/// A Parquet file holding `columns` (top-level, in this order) of the file `source`, with the
/// same row groups.
pub fn project_columns(source: &Bytes, columns: &[&str]) -> Result<Vec<u8>, ParquetError> {
    let meta = ParquetMetaDataReader::new()
        .with_page_index_policy(PageIndexPolicy::Optional)
        .parse_and_finish(source)?;
    let file = meta.file_metadata();
    let descr = file.schema_descr();
    let fields = descr.root_schema().get_fields();
    if descr.num_columns() != fields.len() {
        return Err(ParquetError::General(
            "column projection supports flat schemas only".into(),
        ));
    }
    let idx = columns
        .iter()
        .map(|c| {
            fields
                .iter()
                .position(|f| f.name() == *c)
                .ok_or_else(|| ParquetError::General(format!("column {c} is not in the file")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let root = Type::group_type_builder(descr.root_schema().name())
        .with_fields(idx.iter().map(|&i| fields[i].clone()).collect())
        .build()?;

    let mut out = SerializedFileWriter::new(
        Vec::with_capacity(source.len()),
        Arc::new(root),
        Arc::new(WriterProperties::builder().build()),
    )?;
    for (g, group) in meta.row_groups().iter().enumerate() {
        let mut rg = out.next_row_group()?;
        for &i in &idx {
            let chunk = group.column(i);
            rg.append_column(
                source,
                ColumnCloseResult {
                    bytes_written: chunk.compressed_size() as u64,
                    rows_written: group.num_rows() as u64,
                    metadata: chunk.clone(),
                    bloom_filter: None,
                    column_index: meta.column_index().map(|c| c[g][i].clone()),
                    offset_index: meta.offset_index().map(|o| o[g][i].clone()),
                },
            )?;
        }
        rg.close()?;
    }
    // Arrow readers restore exact types (time zones) from the embedded Arrow schema.
    let arrow = parquet_to_arrow_schema(descr, file.key_value_metadata())?;
    let arrow = arrow.project(&idx)?;
    out.append_key_value_metadata(KeyValue::new(
        ARROW_SCHEMA_KEY.to_string(),
        encode_arrow_schema(&arrow),
    ));
    out.into_inner()
}

/// Delta file statistics (`stats` JSON of an add action) restricted to `columns`.
pub fn project_stats(stats: &str, columns: &[&str]) -> Result<String, serde_json::Error> {
    let mut v: serde_json::Value = serde_json::from_str(stats)?;
    for key in ["minValues", "maxValues", "nullCount"] {
        if let Some(serde_json::Value::Object(m)) = v.get_mut(key) {
            m.retain(|k, _| columns.contains(&k.as_str()));
        }
    }
    serde_json::to_string(&v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use deltalake::parquet::arrow::ArrowWriter;
    use deltalake::parquet::basic::Compression;

    fn file(rows: usize) -> (RecordBatch, Bytes) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("label", DataType::Utf8, true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("op", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(0..rows as i64)),
                Arc::new(StringArray::from_iter(
                    (0..rows).map(|i| (i % 7 != 0).then(|| format!("label-{i}"))),
                )),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values((0..rows as i64).map(|i| i * 1000))
                        .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(vec!["snapshot"; rows])),
            ],
        )
        .unwrap();
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(1000))
            .set_data_page_row_count_limit(100)
            .set_write_batch_size(100)
            .build();
        let mut w = ArrowWriter::try_new(Vec::new(), schema, Some(props)).unwrap();
        w.write(&batch).unwrap();
        (batch, Bytes::from(w.into_inner().unwrap()))
    }

    #[test]
    fn projected_file_reads_back_as_the_projected_batch() {
        let (batch, source) = file(2500);
        let out = project_columns(&source, &["at", "id", "label"]).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(out))
            .unwrap()
            .build()
            .unwrap();
        let got: Vec<RecordBatch> = reader.collect::<Result<_, _>>().unwrap();
        let got = arrow::compute::concat_batches(&got[0].schema(), &got).unwrap();
        let want = batch.project(&[2, 0, 1]).unwrap();
        assert_eq!(got.schema(), want.schema(), "types incl. time zone kept");
        assert_eq!(got, want);
    }

    #[test]
    fn row_groups_statistics_and_page_index_are_kept() {
        let (_, source) = file(2500);
        let out = Bytes::from(project_columns(&source, &["label", "id"]).unwrap());
        let meta = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Required)
            .parse_and_finish(&out)
            .unwrap();
        assert_eq!(meta.num_row_groups(), 3);
        let id = meta.row_group(1).column(1);
        assert_eq!(id.column_path().string(), "id");
        let stats = id.statistics().expect("statistics copied");
        assert_eq!(stats.min_bytes_opt(), Some(&1000i64.to_le_bytes()[..]));
        assert_eq!(meta.offset_index().unwrap()[1][1].page_locations.len(), 10);
    }

    #[test]
    fn unknown_column_is_an_error() {
        let (_, source) = file(10);
        assert!(project_columns(&source, &["nope"]).is_err());
        assert!(project_columns(&Bytes::from_static(b"not parquet"), &["id"]).is_err());
    }

    #[test]
    fn stats_keep_only_projected_columns() {
        let s = r#"{"numRecords":3,"minValues":{"id":1,"op":"snapshot"},"maxValues":{"id":3,"op":"snapshot"},"nullCount":{"id":0,"op":0},"tightBounds":true}"#;
        let v: serde_json::Value =
            serde_json::from_str(&project_stats(s, &["id"]).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"numRecords":3,"minValues":{"id":1},"maxValues":{"id":3},"nullCount":{"id":0},"tightBounds":true})
        );
    }
}
