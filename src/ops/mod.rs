//! Operator commands: slots, preflight check, status, verify, query, backfill.
//!
//! Each command returns a serializable report; the CLI prints it as a human table or `--json`.
//! These talk to Postgres through tokio-postgres and read the warehouse through DataFusion.

pub mod backfill;
pub mod canon;
pub mod check;
pub mod query;
pub mod slots;
pub mod status;
pub mod verify;

/// A plain text table: headers, then rows, columns padded to their widest cell.
pub fn text_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_are_aligned() {
        let t = super::text_table(&["a", "bb"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "a    bb\nxyz  1\n");
    }
}
