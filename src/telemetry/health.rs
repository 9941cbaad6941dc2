//! What the process is doing, as the orchestrator's probes see it: `/healthz` answers while the
//! process runs, `/readyz` only while it is snapshotting or streaming.

use std::sync::atomic::{AtomicU8, Ordering};

use super::METRICS;

/// The pipeline's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Connecting and preparing the slot.
    Starting = 0,
    /// Copying tables (initial snapshot).
    Snapshotting = 1,
    /// Consuming the slot.
    Streaming = 2,
    /// Waiting to reconnect after a transient error.
    Reconnecting = 3,
    /// Draining after a shutdown request, or stopped.
    Stopping = 4,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Snapshotting => "snapshotting",
            Phase::Streaming => "streaming",
            Phase::Reconnecting => "reconnecting",
            Phase::Stopping => "stopping",
        }
    }

    pub fn is_ready(self) -> bool {
        matches!(self, Phase::Snapshotting | Phase::Streaming)
    }

    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Snapshotting,
            2 => Phase::Streaming,
            3 => Phase::Reconnecting,
            4 => Phase::Stopping,
            _ => Phase::Starting,
        }
    }
}

/// The process's phase (one pipeline per process).
pub struct Health {
    phase: AtomicU8,
}

pub static HEALTH: Health = Health {
    phase: AtomicU8::new(Phase::Starting as u8),
};

impl Health {
    pub fn set(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        METRICS.ready.set(i64::from(phase.is_ready()));
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }
}
