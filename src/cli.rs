//! The `walden` command line: the only place that uses `anyhow` and prints errors for people.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::Config;
use crate::pipeline::{self, Mode};

#[derive(Parser, Debug)]
#[command(
    name = "walden",
    version,
    about = "Postgres change-data-capture into Delta Lake, exactly once"
)]
pub struct Cli {
    /// Log lines for people (coloured on a terminal) or JSON lines for collectors.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "WALDEN_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: crate::telemetry::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Stream changes from the slot into the warehouse until SIGTERM/SIGINT.
    Run {
        /// TOML config file; WALDEN_* environment variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Drain everything committed before the start, then exit (cron / serverless mode).
        #[arg(long)]
        once: bool,
    },
    /// List the warehouse's tables with row counts and applied LSNs, and a few mirror rows.
    Tables {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Mirror rows to print per table.
        #[arg(long, default_value_t = 5)]
        rows: usize,
    },
    /// Replication slots: list, create, drop.
    Slot {
        #[command(subcommand)]
        action: SlotAction,
    },
    /// Preflight: is the server ready for walden? Says exactly what to fix; exit 1 when not.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Per table: mirror rows, applied LSN, last commit; the slot's lag.
    Status {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Compare source and mirror (row counts and checksums); exit 1 on drift.
    Verify {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only this table (`schema.table`).
        #[arg(long)]
        table: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// DataFusion SQL over the warehouse: mirrors as `schema.table`, changelogs as `changes.schema.table`.
    Query {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "table")]
        format: crate::ops::query::Format,
        sql: String,
    },
    /// Re-copy one table consistently with the stream (repair, or a table added to the publication).
    Backfill {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// `schema.table`
        #[arg(long)]
        table: String,
    },
    /// Erase a data subject from the warehouse: rows out of every mapped table (changelog and
    /// mirror), the files that held them deleted now, a receipt under `_walden/erasures/`.
    Forget {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// `name=identifier`, the name from `[privacy.subjects]`, e.g. `customer=42`.
        #[arg(long)]
        subject: crate::privacy::scan::Subject,
        /// Say what would be erased; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Erase even though the source still holds rows of the subject.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Search every file under the warehouse's tables of a data subject (referenced by a Delta
    /// version or not) for the subject's identifier; lists each file that holds it, exit 1 if any.
    VerifyErasure {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// `name=identifier`, the name from `[privacy.subjects]`, e.g. `customer=42`.
        #[arg(long)]
        subject: crate::privacy::scan::Subject,
        #[arg(long)]
        json: bool,
    },
    /// Compact small files, set the retention of old versions, VACUUM what is past it, once
    /// (`walden run` does the same in the background; `[maintenance]`).
    Maintain {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only this table (`schema.table`).
        #[arg(long)]
        table: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SlotAction {
    /// Every replication slot on the server, with retained WAL.
    List {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Create a logical pgoutput slot (default: source.slot). No snapshot is taken.
    Create {
        #[arg(long, short)]
        config: Option<PathBuf>,
        name: Option<String>,
    },
    /// Drop a slot (default: source.slot); an active one only with --force.
    Drop {
        #[arg(long, short)]
        config: Option<PathBuf>,
        name: Option<String>,
        /// Terminate the backend holding the slot first.
        #[arg(long)]
        force: bool,
    },
}

/// Exit status of a command that ran but found a problem (check, verify).
#[derive(Debug)]
struct Failed;

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failed")
    }
}

impl std::error::Error for Failed {}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Two settings of glibc's malloc, made before any other thread starts:
///
/// - It raises its mmap threshold to the size of the largest block freed (up to 32 MiB), after
///   which a flush's large, short-lived buffers (a part's rows, Arrow columns, Parquet pages)
///   come from the heap arenas and fragment them: the process keeps their pages. A fixed
///   threshold keeps such blocks mapped, so they go back to the system when freed (1,000,000
///   updates in one transaction: peak RSS 356 → 249 MiB, same time; bench/RESULTS.md).
/// - It gives a thread that finds the arenas busy an arena of its own, up to eight per core, and
///   each arena keeps what is freed into it. Under a steady stream the flushes' buffers are
///   freed on whichever tokio worker or blocking thread runs next, so RSS grew ~27 MiB a
///   minute while the live heap stayed ~16 MiB (heaptrack). Two arenas per core: the same
///   freshness, under half the growth (bench/RESULTS.md, "Memory under a steady stream").
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(2 * cores).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets an allocator parameter; called before any other thread
        // starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init_logging(cli.log_format);
    tune_allocator();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Failed>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, once } => {
            let cfg = Config::load(config.as_deref())?;
            tracing::debug!(config = ?cfg, "configuration");
            let (tx, rx) = watch::channel(false);
            tokio::spawn(async move {
                wait_for_signal().await;
                let _ = tx.send(true);
            });
            let mode = if once { Mode::Once } else { Mode::Continuous };
            let s = pipeline::run(&cfg, mode, rx).await?;
            tracing::info!(
                transactions = s.transactions,
                changes = s.changes,
                confirmed = %s.confirmed,
                "stopped cleanly"
            );
            Ok(())
        }
        Command::Tables { config, rows } => {
            let cfg = Config::load(config.as_deref())?;
            let report = crate::apply::inspect::describe(&cfg, rows)
                .await
                .context("reading the warehouse")?;
            print!("{report}");
            Ok(())
        }
        Command::Slot { action } => {
            let (config, json) = match &action {
                SlotAction::List { config, json } => (config, *json),
                SlotAction::Create { config, .. } | SlotAction::Drop { config, .. } => {
                    (config, false)
                }
            };
            let cfg = Config::load(config.as_deref())?;
            let sql = crate::source::connect_sql(&cfg.source).await?;
            match action {
                SlotAction::List { .. } => {
                    let slots = crate::ops::slots::list(&sql).await?;
                    if json {
                        print_json(&slots)?;
                    } else {
                        print!("{}", crate::ops::slots::render(&slots));
                    }
                }
                SlotAction::Create { name, .. } => {
                    let name = name.unwrap_or(cfg.source.slot.clone());
                    let lsn = crate::ops::slots::create(&sql, &name).await?;
                    println!("created slot {name} at {lsn}");
                }
                SlotAction::Drop { name, force, .. } => {
                    let name = name.unwrap_or(cfg.source.slot.clone());
                    crate::ops::slots::drop(&sql, &name, force).await?;
                    println!("dropped slot {name}");
                }
            }
            Ok(())
        }
        Command::Check { config, json } => {
            let cfg = Config::load(config.as_deref())?;
            let report = crate::ops::check::run(&cfg).await;
            if json {
                print_json(&report)?;
            } else {
                print!("{}", report.render());
            }
            if report.ok {
                Ok(())
            } else {
                Err(Failed.into())
            }
        }
        Command::Status { config, json } => {
            let cfg = Config::load(config.as_deref())?;
            let sql = crate::source::connect_sql(&cfg.source).await?;
            let status = crate::ops::status::run(&cfg, &sql).await?;
            if json {
                print_json(&status)?;
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        Command::Verify {
            config,
            table,
            json,
        } => {
            let cfg = Config::load(config.as_deref())?;
            let v = crate::ops::verify::run(&cfg, table.as_deref()).await?;
            if json {
                print_json(&v)?;
            } else {
                print!("{}", v.render());
            }
            if v.ok {
                Ok(())
            } else {
                Err(Failed.into())
            }
        }
        Command::Forget {
            config,
            subject,
            dry_run,
            force,
            json,
        } => {
            let cfg = Config::load(config.as_deref())?;
            let receipt = crate::privacy::forget::forget(&cfg, &subject, dry_run, force).await?;
            if json {
                print_json(&receipt)?;
            } else {
                print!("{}", receipt.render());
            }
            if receipt.remaining == 0 {
                Ok(())
            } else {
                Err(Failed.into())
            }
        }
        Command::VerifyErasure {
            config,
            subject,
            json,
        } => {
            let cfg = Config::load(config.as_deref())?;
            let scan = crate::privacy::scan::find(&cfg, &subject).await?;
            if json {
                print_json(&scan)?;
            } else {
                print!("{}", scan.render());
            }
            if scan.places.is_empty() {
                Ok(())
            } else {
                Err(Failed.into())
            }
        }
        Command::Query {
            config,
            format,
            sql,
        } => {
            let cfg = Config::load(config.as_deref())?;
            let batches = crate::ops::query::run(&cfg, &sql).await?;
            print!("{}", crate::ops::query::render(&batches, format)?);
            Ok(())
        }
        Command::Backfill { config, table } => {
            let cfg = Config::load(config.as_deref())?;
            let s = crate::ops::backfill::run(&cfg, &table).await?;
            println!("backfilled {table}: {} rows in {:.1}s", s.rows, s.seconds);
            Ok(())
        }
        Command::Maintain {
            config,
            table,
            json,
        } => {
            let cfg = Config::load(config.as_deref())?;
            let warehouse = crate::sink::Warehouse::new(&cfg.warehouse)?;
            let r = crate::maintain::round(&warehouse, &cfg.maintenance, table.as_deref()).await?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "maintained {} Delta tables: {} compacted ({} small files into {}), {} files purged of deleted rows, {} files vacuumed{}",
                    r.tables,
                    r.compacted_tables,
                    r.files_removed,
                    r.files_added,
                    r.files_purged,
                    r.files_vacuumed,
                    if r.deferred > 0 { format!(", {} left for the next round (maintenance.budget_s)", r.deferred) } else { String::new() }
                );
            }
            if r.errors > 0 {
                anyhow::bail!("maintenance failed for {} tables (see the log)", r.errors);
            }
            Ok(())
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
