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
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init_logging();
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
