//! TLS to Postgres: a cluster of its own that accepts only TLS over TCP (`hostnossl … reject`),
//! with certificates from a throwaway CA made here. walden streams through it with
//! verify-full; verify-full refuses a wrong host name and an unknown CA; require accepts a
//! self-signed certificate; a client certificate authenticates; sslmode=disable is refused.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use walden::config::Config;

use crate::pg::{connect, Cluster};
use crate::warehouse::{assert_verified, run_once};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(p, key),
    }
}

/// A certificate (PEM) and its key (PEM) for `names`, with common name `cn`, signed by `ca` or
/// self-signed.
fn leaf(
    ca: Option<&Ca>,
    names: &[&str],
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(names).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = match ca {
        Some(ca) => p.signed_by(&key, &ca.issuer).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    (cert.pem(), key.serialize_pem())
}

fn tls_config(url: &str, slot: &str) -> Config {
    let wh = crate::pg::warehouse_dir(slot);
    let text = format!(
        "[source]\nurl = \"{url}\"\nslot = \"{slot}\"\npublication = \"walden\"\n\
         create_publication = true\nconnect_timeout_s = 5\n\
         [warehouse]\nurl = \"{}\"\n[batch]\nmax_rows = 500\nmax_delay_ms = 200\n",
        wh.display()
    );
    Config::from_toml_and_env(&text, "test", Vec::new()).unwrap()
}

async fn run_err(cfg: &Config) -> walden::pipeline::PipelineError {
    let (_tx, rx) = tokio::sync::watch::channel(false);
    walden::pipeline::run(cfg, walden::pipeline::Mode::Once, rx)
        .await
        .expect_err("walden connected where it must not")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_certificates_and_client_certificates_work_as_libpq_says() {
    let ca = ca("walden test CA");
    let (server_crt, server_key) = leaf(
        Some(&ca),
        &["localhost"],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (self_crt, self_key) = leaf(
        None,
        &["localhost"],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_crt, client_key) = leaf(
        Some(&ca),
        &[],
        "walden_cert",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let hba = "local all all trust\n\
               hostssl all walden_cert 127.0.0.1/32 cert\n\
               hostssl replication walden_cert 127.0.0.1/32 cert\n\
               hostssl all all 127.0.0.1/32 trust\n\
               hostssl replication all 127.0.0.1/32 trust\n\
               hostnossl all all 127.0.0.1/32 reject\n\
               hostnossl replication all 127.0.0.1/32 reject\n";
    let ca_pem = ca.pem.clone();
    let c = tokio::task::spawn_blocking(move || {
        Cluster::start_custom(
            "logical",
            hba,
            "-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key \
             -c ssl_ca_file=ca.crt",
            &[
                ("server.crt", server_crt.as_bytes()),
                ("server.key", server_key.as_bytes()),
                ("ca.crt", ca_pem.as_bytes()),
            ],
        )
    })
    .await
    .unwrap();
    // The tests' own connections go over the Unix socket (TCP without TLS is rejected).
    let admin = connect(&format!(
        "host={} port={} user=postgres dbname=postgres",
        c.dir.display(),
        c.port
    ))
    .await;
    admin.batch_execute("CREATE DATABASE tls").await.unwrap();
    admin
        .batch_execute("CREATE ROLE walden_cert LOGIN REPLICATION SUPERUSER")
        .await
        .unwrap();
    let db = connect(&format!(
        "host={} port={} user=postgres dbname=tls",
        c.dir.display(),
        c.port
    ))
    .await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 200) g",
    )
    .await
    .unwrap();
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = files.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let root = write("root.crt", &ca.pem);
    let other_root = write("other.crt", &ca_pem_of_another_ca());
    let (client_crt, client_key) = (
        write("client.crt", &client_crt),
        write("client.key", &client_key),
    );
    let url = |host: &str, user: &str, params: &str| {
        format!("postgres://{user}@{host}:{}/tls?{params}", c.port)
    };

    // verify-full by name: snapshot and stream, replication and SQL connections all over TLS.
    let cfg = tls_config(
        &url(
            "localhost",
            "postgres",
            &format!("sslmode=verify-full&sslrootcert={root}"),
        ),
        "tls_full",
    );
    run_once(&cfg).await;
    db.batch_execute("UPDATE t SET v = v || '!' WHERE id % 4 = 0; DELETE FROM t WHERE id = 7")
        .await
        .unwrap();
    run_once(&cfg).await;
    assert_verified(&cfg).await;
    // Every record walden read and wrote was intact (the replication reader never bypasses TLS).
    let log = std::fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(!log.contains("SSL error"), "{log}");

    // verify-full refuses a certificate that does not name the host (127.0.0.1), and a CA it
    // does not know; verify-ca accepts the first.
    let by_ip = url(
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={root}"),
    );
    let e = run_err(&tls_config(&by_ip, "tls_ip")).await;
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("TLS with Postgres"), "{e}");
    assert!(
        e.to_string().contains("not valid for name \"127.0.0.1\""),
        "{e}"
    );
    let unknown = url(
        "localhost",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={other_root}"),
    );
    let e = run_err(&tls_config(&unknown, "tls_unknown")).await;
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    let ca_only = url(
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-ca&sslrootcert={root}"),
    );
    run_once(&tls_config(&ca_only, "tls_ca")).await;

    // A client certificate instead of a password (pg_hba: cert), and without it: refused.
    let cert_auth = url(
        "localhost",
        "walden_cert",
        &format!("sslmode=verify-full&sslrootcert={root}&sslcert={client_crt}&sslkey={client_key}"),
    );
    run_once(&tls_config(&cert_auth, "tls_cert")).await;
    let no_cert = url(
        "localhost",
        "walden_cert",
        &format!("sslmode=verify-full&sslrootcert={root}"),
    );
    let e = run_err(&tls_config(&no_cert, "tls_nocert")).await;
    assert!(!e.is_transient(), "{e}");

    // sslmode=disable meets `hostnossl … reject`: a definite error that says so.
    let plain = url("127.0.0.1", "postgres", "sslmode=disable");
    let e = run_err(&tls_config(&plain, "tls_plain")).await;
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("no encryption"), "{e}");

    // A self-signed server certificate: require (and the default, prefer) accept it;
    // verify-full with the CA does not.
    // (The files named on the command line are rewritten: `-c` settings outrank ALTER SYSTEM.)
    std::fs::write(c.data_dir().join("server.crt"), &self_crt).unwrap();
    std::fs::write(c.data_dir().join("server.key"), &self_key).unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    run_once(&tls_config(
        &url("127.0.0.1", "postgres", "sslmode=require"),
        "tls_req",
    ))
    .await;
    run_once(&tls_config(&url("127.0.0.1", "postgres", ""), "tls_prefer")).await;
    // allow: walden asks for TLS first (as prefer), which this server insists on.
    run_once(&tls_config(
        &url("127.0.0.1", "postgres", "sslmode=allow"),
        "tls_allow",
    ))
    .await;
    let e = run_err(&tls_config(
        &url(
            "localhost",
            "postgres",
            &format!("sslmode=verify-full&sslrootcert={root}"),
        ),
        "tls_self",
    ))
    .await;
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("TLS with Postgres"), "{e}");
}

fn ca_pem_of_another_ca() -> String {
    ca("some other CA").pem
}

/// The shared test cluster runs without TLS: `require` refuses it; `prefer` (the default),
/// `allow` and `disable` use it in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_tls_is_refused_when_the_mode_requires_it() {
    let db = crate::pg::test_db("tls_off").await;
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let e = run_err(&tls_config(
        &format!("{}?sslmode=require", db.url),
        "tls_off_req",
    ))
    .await;
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("does not offer TLS"), "{e}");
    run_once(&tls_config(
        &format!("{}?sslmode=prefer", db.url),
        "tls_off_prefer",
    ))
    .await;
    for mode in ["disable", "allow"] {
        let url = format!("{}?sslmode={mode}", db.url);
        run_once(&tls_config(&url, &format!("tls_off_{mode}"))).await;
    }
}
