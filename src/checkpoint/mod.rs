//! Positions in the WAL and the rule for what may be confirmed to Postgres.
//!
//! Owns [`Lsn`] and [`Frontier`]: the pipeline reports transactions as they are received and as
//! each table makes them durable; the frontier answers which LSN is safe to confirm. Invariants:
//! received ≥ confirmed; confirmed = min over tables with undurable data of their oldest undurable
//! commit LSN, or the end of the last received transaction when nothing is pending.

pub mod marker;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// A WAL position (log sequence number).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an LSN (expected X/Y)"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|e| format!("LSN {s:?}: {e}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|e| format!("LSN {s:?}: {e}"))?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(format!("LSN {s:?} out of range"));
        }
        Ok(Lsn((hi << 32) | lo))
    }
}

/// How far one Delta table has applied the source: every change of the transactions committed at
/// or below `lsn`, and, of the larger transaction committed at `partial.0`, the changes numbered
/// up to `partial.1` (a transaction too large for one batch lands in several commits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub lsn: Lsn,
    pub partial: Option<(Lsn, i64)>,
}

impl Applied {
    pub fn at(lsn: Lsn) -> Self {
        Applied { lsn, partial: None }
    }

    /// Change number `seq` of the transaction committed at `lsn` is already applied.
    pub fn covers(&self, lsn: Lsn, seq: i64) -> bool {
        lsn <= self.lsn || self.partial.is_some_and(|(l, s)| l == lsn && seq <= s)
    }

    /// Everything `other` covers, this covers too.
    pub fn includes(&self, other: Applied) -> bool {
        other.lsn <= self.lsn
            && other
                .partial
                .filter(|(l, _)| *l > other.lsn)
                .is_none_or(|(l, s)| self.covers(l, s))
    }
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.partial {
            Some((l, s)) if l > self.lsn => write!(f, "{} (+ {l} through change {s})", self.lsn),
            _ => write!(f, "{}", self.lsn),
        }
    }
}

/// Tracks what has been received and what each table holds undurably.
///
/// Keys are source tables (whose changelog and mirror are applied together; each Delta table also
/// records its own LSN, so a crash between the two is harmless). Buffered data is either
/// `pending` (still being received) or `in_flight` (handed to a flush that has not finished).
#[derive(Debug, Default)]
pub struct Frontier {
    /// End LSN of the last whole transaction received (or the server position when idle).
    received_end: Lsn,
    /// Per table: commit LSN of the oldest buffered transaction not yet handed to a flush.
    pending: BTreeMap<String, Lsn>,
    /// Per table: commit LSN of the oldest transaction in the flush under way.
    in_flight: BTreeMap<String, Lsn>,
}

impl Frontier {
    pub fn new(start: Lsn) -> Self {
        Frontier {
            received_end: start,
            pending: BTreeMap::new(),
            in_flight: BTreeMap::new(),
        }
    }

    /// A whole transaction was received; `tables` got changes from it.
    pub fn received<'a>(
        &mut self,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        tables: impl IntoIterator<Item = &'a str>,
    ) {
        for t in tables {
            self.pending.entry(t.to_string()).or_insert(commit_lsn);
        }
        self.received_end = self.received_end.max(end_lsn);
    }

    /// The server reports its position while no transaction is open: nothing before it is ours.
    pub fn idle_at(&mut self, server_lsn: Lsn) {
        self.received_end = self.received_end.max(server_lsn);
    }

    /// Everything pending is handed to a flush (at most one flush is under way at a time).
    pub fn begin_flush(&mut self) {
        debug_assert!(self.in_flight.is_empty(), "one flush at a time");
        let pending = std::mem::take(&mut self.pending);
        for (t, lsn) in pending {
            let e = self.in_flight.entry(t).or_insert(lsn);
            *e = (*e).min(lsn);
        }
    }

    /// The flush under way made `table` durable.
    pub fn durable(&mut self, table: &str) {
        self.in_flight.remove(table);
    }

    /// Some received data is not durable yet.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.in_flight.is_empty()
    }

    pub fn received_end(&self) -> Lsn {
        self.received_end
    }

    /// The LSN that may be confirmed to Postgres: WAL before it is no longer needed.
    ///
    /// Confirming a transaction's commit LSN (not its end) makes the server send it again after a
    /// restart, so a table that has not made it durable still gets it.
    pub fn confirmable(&self) -> Lsn {
        self.pending
            .values()
            .chain(self.in_flight.values())
            .min()
            .copied()
            .unwrap_or(self.received_end)
    }
}

/// Crash-test hook: when `WALDEN_FAILPOINTS` (comma-separated) names `name`, the process aborts
/// here, as a kill at exactly this point would. Unset in production; read once.
pub fn failpoint(name: &str) {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        std::env::var("WALDEN_FAILPOINTS")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    });
    if armed.iter().any(|a| a == name) {
        eprintln!("walden: failpoint {name} hit, aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_covers_whole_transactions_and_the_part_of_a_large_one() {
        let a = Applied {
            lsn: Lsn(100),
            partial: Some((Lsn(200), 41)),
        };
        assert!(a.covers(Lsn(100), 999_999));
        assert!(a.covers(Lsn(50), 0));
        assert!(a.covers(Lsn(200), 0) && a.covers(Lsn(200), 41));
        assert!(!a.covers(Lsn(200), 42));
        assert!(
            !a.covers(Lsn(150), 0),
            "a transaction between them is not applied"
        );
        assert!(!a.covers(Lsn(300), 0));
        assert!(!Applied::at(Lsn(100)).covers(Lsn(101), 0));
        assert_eq!(a.to_string(), "0/64 (+ 0/C8 through change 41)");
    }

    #[test]
    fn lsn_text_round_trip() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("nope".parse::<Lsn>().is_err());
        assert!("1/2/3".parse::<Lsn>().is_err());
        assert!("100000000/0".parse::<Lsn>().is_err());
    }

    #[test]
    fn confirm_waits_for_the_slowest_table() {
        let mut f = Frontier::new(Lsn(100));
        assert_eq!(f.confirmable(), Lsn(100));
        f.received(Lsn(200), Lsn(210), ["a", "b"]);
        f.received(Lsn(300), Lsn(310), ["a"]);
        assert_eq!(f.confirmable(), Lsn(200));
        f.begin_flush();
        // received while the flush is under way
        f.received(Lsn(400), Lsn(410), ["a"]);
        f.durable("a");
        assert_eq!(f.confirmable(), Lsn(200), "b still holds txn 200");
        f.durable("b");
        assert_eq!(f.confirmable(), Lsn(400), "txn 400 of a is not durable yet");
        f.begin_flush();
        f.durable("a");
        assert_eq!(f.confirmable(), Lsn(410));
        f.idle_at(Lsn(500));
        assert_eq!(f.confirmable(), Lsn(500));
        f.idle_at(Lsn(50));
        assert_eq!(f.confirmable(), Lsn(500), "never goes back");
    }
}
