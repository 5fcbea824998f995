//! Shared by the PostgreSQL tests: where the server is (`ANNALS_PG_URL`),
//! whether the tests are switched off (`ANNALS_PG=off`), a fresh schema per
//! store so tests run in parallel, and a failure that says how to start the
//! server when it is missing.

#![allow(dead_code, unreachable_pub)]

pub mod models;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use annals::store::{PostgresConfig, PostgresStore};
use annals::StoreError;

/// The server the tests use unless `ANNALS_PG_URL` names another.
pub const DEFAULT_URL: &str = "postgresql://postgres@127.0.0.1:5432/test";

/// The prefix of every schema the tests create: `annals_t_<pid>_<n>`.
const PREFIX: &str = "annals_t_";

pub const HOW_TO_START: &str = "start PostgreSQL with \
    `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
    point ANNALS_PG_URL at another server, or set ANNALS_PG=off to skip the PostgreSQL tests";

pub fn url() -> String {
    std::env::var("ANNALS_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// True only when the user switched the PostgreSQL tests off explicitly.
pub fn disabled() -> bool {
    let off = std::env::var("ANNALS_PG").is_ok_and(|v| v == "off");
    if off {
        eprintln!("ANNALS_PG=off: PostgreSQL test skipped");
    }
    off
}

/// A schema name no other test (of this or another process) uses.
pub fn fresh_schema() -> String {
    static CLEANED: Once = Once::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    CLEANED.call_once(drop_stale_schemas);
    format!(
        "{PREFIX}{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A configuration for a fresh schema on the test server.
pub fn config() -> PostgresConfig {
    PostgresConfig::new(url())
        .schema(fresh_schema())
        .pool_size(4)
}

/// Opens a store, failing the test with how to start the server when it
/// cannot be reached.
pub fn open(config: PostgresConfig) -> PostgresStore {
    match PostgresStore::open(config) {
        Ok(store) => store,
        Err(StoreError::Backend(error)) => panic!(
            "cannot reach PostgreSQL at {}: {error}\n{HOW_TO_START}",
            url()
        ),
        Err(error) => panic!("cannot open the PostgreSQL store: {error}"),
    }
}

/// Runs `work` against a plain connection to the test server, on a thread
/// of its own (callable from sync code inside a runtime).
pub fn with_client<T: Send + 'static>(
    work: impl FnOnce(&mut tokio_postgres::Client, &tokio::runtime::Runtime) -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (mut client, connection) = runtime
            .block_on(tokio_postgres::connect(&url(), tokio_postgres::NoTls))
            .unwrap_or_else(|e| {
                panic!("cannot reach PostgreSQL at {}: {e}\n{HOW_TO_START}", url())
            });
        let driver = runtime.spawn(connection);
        let result = work(&mut client, &runtime);
        drop(client);
        let _ = runtime.block_on(driver);
        result
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Runs SQL on the test server.
pub fn execute(sql: &str) {
    let sql = sql.to_owned();
    with_client(move |client, runtime| {
        runtime
            .block_on(client.batch_execute(&sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    });
}

/// Drops the schemas left by test processes that are gone.
fn drop_stale_schemas() {
    with_client(|client, runtime| {
        let rows = runtime
            .block_on(client.query(
                "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)",
                &[&PREFIX],
            ))
            .unwrap_or_default();
        for row in rows {
            let name: String = row.get(0);
            let pid = name[PREFIX.len()..].split('_').next().unwrap_or("");
            if !std::path::Path::new("/proc").join(pid).exists() {
                let _ = runtime.block_on(
                    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")),
                );
            }
        }
    });
}

/// The test server's URL with an `application_name`, so that a test can
/// find (and terminate) exactly its store's connections.
pub fn url_with_application_name(name: &str) -> String {
    let url = url();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}application_name={name}")
    } else {
        format!("{url} application_name={name}")
    }
}
