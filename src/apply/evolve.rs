//! The Delta tables' schemas follow the source relation's.
//!
//! Owns how a table's schema changes: a column the source added is added to the Delta table
//! (`ADD COLUMN`, a metadata-only commit); a widened column type (int → bigint, numeric
//! precision up, …) is widened by rewriting the table's files; a column the source dropped stays
//! in Delta and is NULL in rows written from then on; batches are aligned to the table's schema
//! by column name before they are written, so files written before a change read alongside the
//! ones after it.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    new_null_array, Array, ArrayRef, AsArray, RecordBatch, RecordBatchOptions, StringArray,
};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, MetadataExt as _, StructType};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};

use super::settle::ATTEMPTS;
use super::{files, ApplyError, TableErr};
use crate::batch::{OLD_KEY, UNCHANGED, UNREPRESENTABLE};
use crate::sink::writer_properties;

/// Makes the table's schema hold `want`'s columns: columns the source added are added (a
/// metadata-only commit); columns whose type the source widened are widened by rewriting the
/// table's files in the new type (one commit: new schema, old files out, new files in); columns
/// the source dropped stay, NULL from then on. A type change the warehouse cannot follow exactly
/// stops with what to do.
pub async fn evolve(
    table: &mut DeltaTable,
    name: &str,
    want: &Schema,
    storage: &HashMap<String, String>,
) -> Result<(), ApplyError> {
    settled(table, name, Change::Follow(want), storage).await
}

/// Renames columns the source renamed (`(old, new)` in the order they happened), where the table
/// still has the old name and not yet the new one, by rewriting its files under the new names
/// (one commit). The names inside walden's own columns (`_walden_unchanged`,
/// `_walden_unrepresentable`, `_walden_old_key`) are renamed with them. Idempotent: after a crash the renames that
/// committed are skipped.
pub async fn rename(
    table: &mut DeltaTable,
    name: &str,
    renames: &[(String, String)],
    storage: &HashMap<String, String>,
) -> Result<(), ApplyError> {
    settled(table, name, Change::Rename(renames), storage).await
}

/// A change of a table's schema.
#[derive(Clone, Copy)]
enum Change<'a> {
    Follow(&'a Schema),
    Rename(&'a [(String, String)]),
}

/// Makes `change`. Each change reads the table's schema first and does only what is still
/// missing, so a failed commit is settled by reading the table again and making the change
/// again: when the commit happened after all (its answer was lost), nothing is left to do.
async fn settled(
    table: &mut DeltaTable,
    name: &str,
    change: Change<'_>,
    storage: &HashMap<String, String>,
) -> Result<(), ApplyError> {
    let mut attempt = 1;
    loop {
        let done = match change {
            Change::Follow(want) => follow(table, name, want, storage).await,
            Change::Rename(renames) => rename_columns(table, name, renames, storage).await,
        };
        match done {
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                tracing::warn!(table = name, error = %e, attempt, "schema change failed; reading the table again");
                table
                    .update_state()
                    .await
                    .map_err(|e| TableErr(name).delta(e))?;
                attempt += 1;
            }
            done => return done,
        }
    }
}

async fn follow(
    table: &mut DeltaTable,
    name: &str,
    want: &Schema,
    storage: &HashMap<String, String>,
) -> Result<(), ApplyError> {
    let err = TableErr(name);
    let delta = |e| err.delta(e);
    let have = table_schema(table).map_err(delta)?;
    let retyped = retyped(&have, want);
    if let Some((column, from, to)) = retyped.iter().find(|(_, f, t)| !follows(f, t)) {
        return Err(ApplyError::IncompatibleType {
            table: name.to_string(),
            column: column.clone(),
            from: from.to_string(),
            to: to.to_string(),
        });
    }
    // Rows of a narrower type than the table (see `follows`) need no rewrite: `align` widens them.
    let retyped: Vec<_> = retyped
        .into_iter()
        .filter(|(_, f, t)| widens(f, t))
        .collect();
    if !retyped.is_empty() {
        let fields: Vec<Field> = have
            .fields()
            .iter()
            .map(|f| match retyped.iter().find(|(n, _, _)| n == f.name()) {
                Some((_, _, to)) => f.as_ref().clone().with_data_type(to.clone()),
                None => f.as_ref().clone(),
            })
            .collect();
        tracing::info!(table = %table.table_url(), columns = ?retyped, "widening column types: rewriting the table");
        rewrite(table, name, Arc::new(Schema::new(fields)), storage).await?;
    }
    let have = table_schema(table).map_err(delta)?;
    let missing: Vec<_> = want
        .fields()
        .iter()
        .filter(|f| have.field_with_name(f.name()).is_err())
        .map(|f| f.as_ref().clone())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let st: StructType = (&Schema::new(missing))
        .try_into_kernel()
        .map_err(|e| delta(DeltaTableError::Generic(format!("schema conversion: {e}"))))?;
    tracing::info!(table = %table.table_url(), columns = ?st.fields().map(|f| f.name()).collect::<Vec<_>>(), "adding columns");
    *table = table
        .clone()
        .add_columns()
        .with_fields(st.fields().cloned().collect::<Vec<_>>())
        .await
        .map_err(delta)?;
    Ok(())
}

async fn rename_columns(
    table: &mut DeltaTable,
    name: &str,
    renames: &[(String, String)],
    storage: &HashMap<String, String>,
) -> Result<(), ApplyError> {
    let have = table_schema(table).map_err(|e| TableErr(name).delta(e))?;
    let mut names: Vec<String> = have.fields().iter().map(|f| f.name().clone()).collect();
    let mut done: Vec<(String, String)> = Vec::new();
    for (old, new) in renames {
        if let (Some(i), false) = (names.iter().position(|n| n == old), names.contains(new)) {
            names[i] = new.clone();
            done.push((old.clone(), new.clone()));
        }
    }
    if done.is_empty() {
        return Ok(());
    }
    let fields: Vec<Field> = have
        .fields()
        .iter()
        .zip(&names)
        .map(|(f, n)| f.as_ref().clone().with_name(n))
        .collect();
    tracing::info!(table = %table.table_url(), columns = ?done, "renaming columns: rewriting the table");
    rewrite_with(table, name, Arc::new(Schema::new(fields)), &done, storage).await
}

/// Rewrites every file of `table` in `schema` (same column names, wider types) and commits the new
/// schema with the new files in one commit; a reader sees the table before or after, never a mix.
async fn rewrite(
    table: &mut DeltaTable,
    name: &str,
    schema: SchemaRef,
    storage: &HashMap<String, String>,
) -> Result<(), ApplyError> {
    rewrite_with(table, name, schema, &[], storage).await
}

/// [`rewrite`], renaming columns on the way.
async fn rewrite_with(
    table: &mut DeltaTable,
    name: &str,
    schema: SchemaRef,
    renames: &[(String, String)],
    storage: &HashMap<String, String>,
) -> Result<(), ApplyError> {
    let err = TableErr(name);
    let (delta, arrow) = (|e| err.delta(e), |e| err.arrow(e));
    let state = table.snapshot().map_err(delta)?.clone();
    let mut writer = RecordBatchWriter::try_new(
        table.table_url().as_str(),
        schema.clone(),
        None,
        Some(storage.clone()),
    )
    .map_err(delta)?
    .with_writer_properties(writer_properties());
    let mut actions: Vec<Action> = Vec::new();
    for file in state.log_data().iter() {
        for batch in files::read_live(table, &file).await? {
            let batch = renamed(&batch, renames).map_err(arrow)?;
            let batch = align(&batch, &schema).map_err(arrow)?;
            writer.write(batch).await.map_err(delta)?;
        }
        actions.push(Action::Remove(file.remove_action(true)));
        actions.extend(
            writer
                .flush()
                .await
                .map_err(delta)?
                .into_iter()
                .map(Action::Add),
        );
    }
    let kernel: StructType = schema
        .as_ref()
        .try_into_kernel()
        .map_err(|e| delta(DeltaTableError::Generic(format!("schema conversion: {e}"))))?;
    let metadata = state
        .metadata()
        .clone()
        .with_schema(&kernel)
        .map_err(|e| delta(e.into()))?;
    actions.insert(0, Action::Metadata(metadata));
    let commit = CommitBuilder::from(CommitProperties::default())
        .with_actions(actions)
        .build(
            Some(&state),
            table.log_store(),
            DeltaOperation::Write {
                mode: SaveMode::Overwrite,
                partition_by: None,
                predicate: None,
            },
        )
        .await
        .map_err(delta)?;
    table.state = Some(commit.snapshot());
    Ok(())
}

/// `batch` with its columns renamed, and the names in walden's own columns with them.
fn renamed(
    batch: &RecordBatch,
    renames: &[(String, String)],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    if renames.is_empty() {
        return Ok(batch.clone());
    }
    let to = |n: &str| {
        renames.iter().fold(
            n.to_string(),
            |n, (old, new)| if n == *old { new.clone() } else { n },
        )
    };
    let schema = batch.schema();
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (f, c) in schema.fields().iter().zip(batch.columns()) {
        fields.push(f.as_ref().clone().with_name(to(f.name())));
        let column: ArrayRef = match f.name().as_str() {
            UNREPRESENTABLE | OLD_KEY => Arc::new(map_strings(c.as_ref(), |s| {
                let Ok(serde_json::Value::Object(m)) = serde_json::from_str(s) else {
                    return s.to_string();
                };
                let m: serde_json::Map<String, serde_json::Value> =
                    m.into_iter().map(|(k, v)| (to(&k), v)).collect();
                serde_json::Value::Object(m).to_string()
            })),
            UNCHANGED => Arc::new(map_strings(c.as_ref(), |s| {
                s.split(',').map(to).collect::<Vec<_>>().join(",")
            })),
            _ => c.clone(),
        };
        columns.push(column);
    }
    RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
}

fn map_strings(a: &dyn Array, f: impl Fn(&str) -> String) -> StringArray {
    let a = a.as_string::<i32>();
    a.iter().map(|v| v.map(&f)).collect()
}

/// The table's current schema, as Arrow.
pub fn table_schema(table: &DeltaTable) -> Result<SchemaRef, DeltaTableError> {
    Ok(table.snapshot()?.snapshot().arrow_schema())
}

/// `batch` with exactly `target`'s columns: matched by name, cast where the type differs (a
/// widening), NULL where the batch has no such column (written before the column was added).
pub fn align(
    batch: &RecordBatch,
    target: &SchemaRef,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let schema = batch.schema();
    let columns = target
        .fields()
        .iter()
        .map(|f| match schema.index_of(f.name()) {
            Ok(i) if batch.column(i).data_type() == f.data_type() => Ok(batch.column(i).clone()),
            // Checked: a value that does not fit is an error, never a silent NULL.
            Ok(i) => cast_with_options(
                batch.column(i),
                f.data_type(),
                &CastOptions {
                    safe: false,
                    ..Default::default()
                },
            ),
            Err(_) => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new_with_options(
        target.clone(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
}

/// `to` holds every value of `from` exactly, so the warehouse can change a column's type on its
/// own (ALTER COLUMN … TYPE widening at the source): smaller to larger integers, `real` to
/// `double precision`, numeric precision up at the same scale (or scale up with as many integer
/// digits), and anything whose Postgres text form is the cast's (integers, numerics) to text.
pub fn widens(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    match (from, to) {
        (Int16, Int32 | Int64) | (Int32, Int64) | (Float32, Float64) => true,
        (Decimal128(p1, s1), Decimal128(p2, s2)) => {
            s2 >= s1 && (*p2 as i16 - *s2 as i16) >= (*p1 as i16 - *s1 as i16)
        }
        (Int16 | Int32 | Int64 | Decimal128(..), Utf8) => true,
        _ => false,
    }
}

/// A Delta column of type `have` can follow values of type `want`: the same type, one it widens
/// to ([`widens`], the table is rewritten), or a narrower number it holds as it is (rows decoded
/// before a widening a later copy already has, or a narrowing at the source; `align` widens
/// them). Not into text: numbers meeting a text column are a type change at the source.
pub fn follows(have: &DataType, want: &DataType) -> bool {
    have == want || widens(have, want) || (widens(want, have) && *have != DataType::Utf8)
}

/// Columns of the table whose type the source changed: (name, type in the table, new type).
pub fn retyped(have: &Schema, want: &Schema) -> Vec<(String, DataType, DataType)> {
    want.fields()
        .iter()
        .filter_map(|w| {
            let h = have.field_with_name(w.name()).ok()?;
            (h.data_type() != w.data_type()).then(|| {
                (
                    w.name().clone(),
                    h.data_type().clone(),
                    w.data_type().clone(),
                )
            })
        })
        .collect()
}
