//! PostgreSQL restarted under load (`pg_ctlcluster ... restart`): nothing
//! acknowledged is lost, and the same store, not reopened, appends, reads
//! and feeds its subscribers again by itself. In a test binary of its own,
//! because the restart cuts every connection of the server (cargo runs test
//! binaries one after another). Needs the local cluster and root, as CI
//! has; `ANNALS_PG=off` skips it.

mod pg_support;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::projection::subscribe;
use annals::store::{AppendError, EventFilter, ReadDirection};
use annals::{EventStore, ExpectedVersion, NewEvent, Position, StoreError, StreamId};
use uuid::Uuid;

fn restart_cluster() {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("no /etc/postgresql: this test restarts the local cluster")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .next()
        .expect("no cluster in /etc/postgresql");
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .status()
        .expect("run pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster restart failed: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_restart_under_load_loses_nothing_and_needs_no_reopen() {
    if pg_support::disabled() {
        return;
    }
    let store = Arc::new(pg_support::open(
        pg_support::config().poll_interval(Duration::from_millis(50)),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let mut appenders = Vec::new();
    for task in 0..8 {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        appenders.push(tokio::spawn(async move {
            let mut acknowledged = HashMap::new();
            let mut failures = 0u64;
            let target = StreamId::new(format!("restart-{}", task % 3)).unwrap();
            while !stop.load(Ordering::Acquire) {
                let event = NewEvent::new("Noted", vec![task as u8]);
                let id = event.event_id;
                // Retried with the same id until acknowledged.
                let result = loop {
                    match store
                        .append(&target, ExpectedVersion::Any, vec![event.clone()])
                        .await
                    {
                        Ok(result) => break result,
                        Err(AppendError::Store(
                            StoreError::Backend(_) | StoreError::OutcomeUnknown(_),
                        )) => {
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                };
                acknowledged.insert(id, result.first_position);
            }
            (acknowledged, failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let restarted = Instant::now();
    tokio::task::spawn_blocking(restart_cluster).await.unwrap();
    let restart_took = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);

    let mut acknowledged: HashMap<Uuid, Position> = HashMap::new();
    let mut failures = 0;
    for appender in appenders {
        let (acks, failed) = appender.await.unwrap();
        acknowledged.extend(acks);
        failures += failed;
    }
    eprintln!("restart took {restart_took:?}; appends that failed and were retried: {failures}");

    let mut log = Vec::new();
    loop {
        let page = store
            .read_all(
                Position(log.len() as u64 + 1),
                ReadDirection::Forward,
                1000,
                &EventFilter::All,
            )
            .await
            .expect("reads work again without reopening");
        if page.is_empty() {
            break;
        }
        log.extend(page);
    }
    assert_eq!(
        log.len(),
        acknowledged.len(),
        "lost or unacknowledged events"
    );
    for (index, event) in log.iter().enumerate() {
        assert_eq!(event.position, Position(index as u64 + 1));
        assert_eq!(acknowledged.get(&event.event_id), Some(&event.position));
    }
    // The feed recovered too: a subscriber from the start sees everything,
    // and then an append made after the restart.
    let mut subscription = subscribe(store.clone(), Position::START, EventFilter::All);
    for expected in &log {
        let event = subscription.next().await.unwrap().unwrap();
        assert_eq!(event.event_id, expected.event_id);
    }
    let after = store
        .append(
            &StreamId::new("restart-after").unwrap(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Noted", vec![])],
        )
        .await
        .expect("appends work again without reopening");
    let next = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("the feed did not recover")
        .unwrap()
        .unwrap();
    assert_eq!(next.position, after.last_position);
}
