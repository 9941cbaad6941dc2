//! What operators install: the Helm chart rendered and linted by a real `helm` (from PyPI, see
//! `tests/py/fetch_helm.py`) in every mode, its objects checked (`tests/py/check_chart.py`) and
//! each rendered walden.toml loaded as walden's config; the Dockerfile checked by hadolint.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use crate::python::{build_dir, python};

/// A `helm` binary under the build directory, fetched once.
fn helm(py: &std::path::Path) -> PathBuf {
    static FETCH: Mutex<()> = Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = build_dir().join("walden-helm");
    let helm = dir.join("helm");
    if !helm.exists() {
        let ok = Command::new(py)
            .arg(crate::project_file("tests/py/fetch_helm.py"))
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "fetching helm failed");
    }
    helm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_chart_renders_and_lints_in_every_mode() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let helm = helm(&py);
    let out = tempfile::tempdir().unwrap();
    let chart = crate::project_file("deploy/helm/walden");
    let metrics = crate::project_file("METRICS.md");
    let args = [
        helm.as_os_str(),
        chart.as_os_str(),
        metrics.as_os_str(),
        out.path().as_os_str(),
    ];
    let said = crate::python::run_script(&py, "check_chart.py", &args);
    for case in ["deployment", "pipelines", "sidecar"] {
        assert!(said.contains(&format!("{case}: ")), "{said}");
    }
    // Every rendered walden.toml, with its Secret's variables, is a config walden accepts.
    let mut loaded = Vec::new();
    for entry in std::fs::read_dir(out.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let env: std::collections::BTreeMap<String, String> = serde_json::from_str(
            &std::fs::read_to_string(out.path().join(format!("{name}.env.json"))).unwrap(),
        )
        .unwrap();
        let cfg = walden::config::Config::from_toml_and_env(&text, &name, env)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
        let port = if name == "sidecar-b" { 9188 } else { 9187 };
        assert_eq!(
            cfg.metrics.listen,
            Some(format!("0.0.0.0:{port}")),
            "{name}"
        );
        assert_eq!(cfg.spill.dir, "/var/lib/walden/spill", "{name}");
        assert_eq!(cfg.slot.heartbeat_interval_s, 60, "{name}");
        loaded.push(name);
    }
    loaded.sort();
    assert_eq!(
        loaded,
        [
            "deployment-main",
            "pipelines-billing",
            "pipelines-orders",
            "sidecar-a",
            "sidecar-b"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerfile_passes_hadolint() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let hadolint = py.with_file_name("hadolint");
    let out = Command::new(&hadolint)
        .arg(crate::project_file("Dockerfile"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", hadolint.display()));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
