//! The outbox relay against the real NATS JetStream server at
//! 127.0.0.1:4222: every event reaches a consumer once and in order, also
//! when the relay is `kill -9`ed mid-stream and restarted.
//!
//! Each test makes its own JetStream stream and subject prefix, and deletes
//! the stream at the end. A server that cannot be reached fails the tests;
//! `ANNALS_NATS=off` skips them explicitly.
//!
//! `ANNALS_RELAY_KILLS=N cargo test --release --test relay -- --nocapture`
//! kills the relay N times (default 3) and ends with the line
//! `relay published=N consumer_saw=N duplicates_seen=0 missing=0`.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use annals::store::{EventFilter, Metadata, ReadDirection};
use annals::workflow::{
    JetStreamSink, JetStreamStream, Relay, RelayConfig, HEADER_CAUSATION_ID, HEADER_CORRELATION_ID,
    HEADER_EVENT_TYPE, HEADER_POSITION, HEADER_STREAM_ID, HEADER_VERSION,
};
use annals::{EventStore, ExpectedVersion, NewEvent, Position, RecordedEvent, SledStore, StreamId};
use async_nats::jetstream;
use futures::StreamExt;
use uuid::Uuid;

const NATS_URL: &str = "127.0.0.1:4222";
const START_NATS: &str = "start-stop-daemon --start --oknodo --background \
    --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server \
    -l /var/log/nats-server.log";

const CHILD_DIR: &str = "ANNALS_RELAY_CHILD_DIR";
const CHILD_PREFIX: &str = "ANNALS_RELAY_CHILD_PREFIX";
const CHILD_TARGET: &str = "ANNALS_RELAY_CHILD_TARGET";
const CHILD_RELAY: &str = "crash";

/// Connects to NATS, or returns `None` when `ANNALS_NATS=off` asks to skip.
/// A server that cannot be reached otherwise fails the test.
async fn jetstream_or_skip(test: &str) -> Option<jetstream::Context> {
    if std::env::var("ANNALS_NATS").as_deref() == Ok("off") {
        eprintln!("{test}: skipped, ANNALS_NATS=off");
        return None;
    }
    let connected = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(NATS_URL))
        .await
        .map_err(|_| "timed out".to_owned())
        .and_then(|result| result.map_err(|error| error.to_string()));
    match connected {
        Ok(client) => Some(jetstream::new(client)),
        Err(error) => panic!(
            "{test}: no NATS server at {NATS_URL} ({error}). Start it with:\n  {START_NATS}\n\
             (`.ci/run` does), or set ANNALS_NATS=off to skip the relay tests."
        ),
    }
}

/// A JetStream stream name and subject prefix no other run uses.
fn unique(test: &str) -> (String, String) {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let id = format!("{test}{}x{nanos}", std::process::id());
    (format!("ANNALS_{id}"), format!("annals-test.{id}"))
}

/// One message as a consumer sees it.
#[derive(Debug)]
struct Seen {
    subject: String,
    event_id: Uuid,
    position: u64,
    headers: async_nats::HeaderMap,
    payload: Vec<u8>,
}

/// Reads every message of `stream` with an ordered consumer, in stream order.
async fn consume_all(context: &jetstream::Context, stream: &str) -> Vec<Seen> {
    let mut stream = context.get_stream(stream).await.unwrap();
    let total = stream.info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut seen = Vec::new();
    while (seen.len() as u64) < total {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the consumer receives every stored message")
            .expect("the consumer's stream does not end")
            .unwrap();
        let headers = message.headers.clone().expect("the relay sets headers");
        let header = |name: &str| {
            let value = headers.get(name);
            let value = value.unwrap_or_else(|| panic!("no header {name} in {headers:?}"));
            value.as_str().to_owned()
        };
        seen.push(Seen {
            subject: message.subject.to_string(),
            event_id: headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .expect("the relay sets the message id")
                .as_str()
                .parse()
                .unwrap(),
            position: header(HEADER_POSITION).parse().unwrap(),
            payload: message.payload.to_vec(),
            headers,
        });
    }
    seen
}

/// The whole log, in position order.
async fn read_log(store: &dyn EventStore) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    let mut from = Position(1);
    loop {
        let page = store
            .read_all(from, ReadDirection::Forward, 4096, &EventFilter::All)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        from = last.position.next();
        events.extend(page);
    }
    events
}

/// What the consumer saw, compared with the log.
#[derive(Debug, PartialEq, Eq)]
struct Count {
    consumer_saw: usize,
    duplicates_seen: usize,
    missing: usize,
    unknown: usize,
    out_of_order: usize,
}

/// Counts by the event's identity in the log, its position: a message is a
/// duplicate when its position was seen before, and `unknown` when its
/// position is not in the log or its message id is not that event's id.
fn count(log: &[RecordedEvent], seen: &[Seen]) -> Count {
    let expected: HashMap<u64, Uuid> = log
        .iter()
        .map(|event| (event.position.0, event.event_id))
        .collect();
    let mut distinct = HashSet::new();
    let mut duplicates_seen = 0;
    let mut unknown = 0;
    let mut out_of_order = 0;
    let mut last_position = 0;
    for message in seen {
        if expected.get(&message.position) != Some(&message.event_id) {
            unknown += 1;
        }
        if !distinct.insert(message.position) {
            duplicates_seen += 1;
            continue;
        }
        if message.position <= last_position {
            out_of_order += 1;
        }
        last_position = message.position;
    }
    Count {
        consumer_saw: seen.len(),
        duplicates_seen,
        missing: expected
            .keys()
            .filter(|position| !distinct.contains(*position))
            .count(),
        unknown,
        out_of_order,
    }
}

fn new_event(event_type: &str, n: u64) -> NewEvent {
    NewEvent::new(event_type, n.to_be_bytes().to_vec()).with_metadata(Metadata::new(
        Some(Uuid::from_u128(7)),
        Some(Uuid::from_u128(n as u128)),
    ))
}

/// Appends `count` events over 50 streams of two categories, 100 per append.
async fn append_events(store: &dyn EventStore, first: u64, count: u64) -> Position {
    let mut last = store.head_position();
    let mut n = first;
    while n < first + count {
        let batch = (first + count - n).min(100);
        let category = if n % 2 == 0 { "order" } else { "payment" };
        let stream = StreamId::new(format!("{category}-{}", n % 50)).unwrap();
        let events = (n..n + batch)
            .map(|i| {
                new_event(
                    if i % 3 == 0 {
                        "Order.Placed v2"
                    } else {
                        "OrderPaid"
                    },
                    i,
                )
            })
            .collect();
        last = store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap()
            .last_position;
        n += batch;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_sees_every_event_once_in_order() {
    let Some(context) = jetstream_or_skip("a_consumer_sees_every_event_once_in_order").await else {
        return;
    };
    let (stream_name, prefix) = unique("clean");
    let sink = JetStreamSink::new(context.clone(), &prefix).unwrap();
    sink.ensure_stream(
        &JetStreamStream::new(&stream_name).duplicate_window(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(SledStore::open(dir.path()).unwrap());

    // Catch-up: a backlog, timed for the throughput figure.
    let backlog = 20_000;
    let head = append_events(&*store, 0, backlog).await;
    let started = Instant::now();
    let relay = Relay::start(Arc::clone(&store), RelayConfig::new("clean"), sink.clone())
        .await
        .unwrap();
    relay.wait_for(head).await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "relay_throughput events={backlog} seconds={seconds:.3} events_per_s={:.0}",
        backlog as f64 / seconds
    );

    // Live: events appended while the relay follows the feed.
    let head = append_events(&*store, backlog, 1_000).await;
    let status = relay.wait_for(head).await.unwrap();
    assert_eq!(status.lag, 0);
    assert_eq!(status.events_published, backlog + 1_000);
    assert_eq!(relay.shutdown().await.unwrap(), head);
    assert_eq!(
        store.load_checkpoint("relay:clean").await.unwrap(),
        Some(head)
    );

    let log = read_log(&*store).await;
    let seen = consume_all(&context, &stream_name).await;
    let counted = count(&log, &seen);
    assert_eq!(
        counted,
        Count {
            consumer_saw: log.len(),
            duplicates_seen: 0,
            missing: 0,
            unknown: 0,
            out_of_order: 0
        }
    );
    // Every message carries its event as stored, in position order.
    for (event, message) in log.iter().zip(&seen) {
        assert_eq!(message.event_id, event.event_id);
        assert_eq!(message.position, event.position.0);
        assert_eq!(message.subject, sink.subject_for(event));
        assert_eq!(message.payload, event.payload);
        let header = |name| message.headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(
            header(HEADER_STREAM_ID).as_deref(),
            Some(event.stream_id.as_str())
        );
        assert_eq!(header(HEADER_VERSION), Some(event.version.0.to_string()));
        assert_eq!(
            header(HEADER_EVENT_TYPE).as_deref(),
            Some(event.event_type.as_str())
        );
        assert_eq!(
            header(HEADER_CORRELATION_ID),
            event.metadata.correlation_id.map(|id| id.to_string())
        );
        assert_eq!(
            header(HEADER_CAUSATION_ID),
            event.metadata.causation_id.map(|id| id.to_string())
        );
    }
    // The escaped event type, as documented.
    assert!(seen
        .iter()
        .any(|m| m.subject.ends_with(".order.Order%2EPlaced%20v2")));

    // Replaying from the start re-publishes everything; JetStream drops it
    // all as duplicates inside its window.
    let relay = Relay::start(Arc::clone(&store), RelayConfig::new("clean"), sink.clone())
        .await
        .unwrap();
    let before = sink.duplicates_acknowledged();
    relay.replay_from(Position::START).await.unwrap();
    relay.wait_for(head).await.unwrap();
    relay.shutdown().await.unwrap();
    assert_eq!(sink.duplicates_acknowledged() - before, log.len() as u64);
    let again = context
        .get_stream(&stream_name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(
        again,
        log.len() as u64,
        "a replay adds nothing inside the window"
    );

    store.shutdown().await.unwrap();
    context.delete_stream(&stream_name).await.unwrap();
}

/// The child's role: append events and relay them until the log holds the
/// target, then shut down cleanly and print `DONE`; or be killed before.
#[test]
#[ignore = "run by relay_survives_kill_9 as a child process"]
fn relay_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let prefix = std::env::var(CHILD_PREFIX).unwrap();
    let target: u64 = std::env::var(CHILD_TARGET).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store: Arc<dyn EventStore> = Arc::new(SledStore::open(&dir).unwrap());
        let sink = JetStreamSink::connect(NATS_URL, prefix).await.unwrap();
        // Checkpoints far apart, so that a kill leaves acknowledged but
        // unsaved events that the next run publishes again.
        let config = RelayConfig::new(CHILD_RELAY)
            .batch_size(64)
            .checkpoint_every(700, Duration::from_millis(150));
        let relay = Relay::start(Arc::clone(&store), config, sink.clone())
            .await
            .unwrap();
        println!("STARTED from={}", relay.status().position);
        // Appends of 10 events, paced so that a run lasts a while.
        while store.head_position().0 < target {
            append_events(&*store, store.head_position().0, 10).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let head = store.head_position();
        relay.wait_for(head).await.unwrap();
        let checkpoint = relay.shutdown().await.unwrap();
        store.shutdown().await.unwrap();
        println!(
            "DONE head={head} checkpoint={checkpoint} duplicates_dropped={}",
            sink.duplicates_acknowledged()
        );
    });
}

/// Runs one child. With `kill_after`, kills it (SIGKILL) that long after it
/// started relaying; otherwise waits for it to finish and returns its `DONE`
/// line.
fn run_child(dir: &Path, prefix: &str, target: u64, kill_after: Option<Duration>) -> String {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "relay_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_PREFIX, prefix)
        .env(CHILD_TARGET, target.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // libtest prints its own lines first, and "test relay_child ... " before
    // the child's first line.
    let start_deadline = Instant::now() + Duration::from_secs(60);
    let started = std::iter::from_fn(|| {
        received
            .recv_timeout(start_deadline.saturating_duration_since(Instant::now()))
            .ok()
    })
    .any(|line| line.contains("STARTED"));
    let mut done = String::new();
    match kill_after {
        Some(delay) => {
            std::thread::sleep(delay);
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
        None => {
            let deadline = Instant::now() + Duration::from_secs(120);
            while let Ok(line) =
                received.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                if let Some(at) = line.find("DONE") {
                    done = line[at..].to_owned();
                    break;
                }
            }
            let status = child.wait().unwrap();
            assert!(status.success(), "the last child failed: {status}");
        }
    }
    reader.join().unwrap();
    assert!(started, "the child did not start relaying");
    done
}

/// A tiny deterministic generator for the kill times.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_survives_kill_9() {
    let Some(context) = jetstream_or_skip("relay_survives_kill_9").await else {
        return;
    };
    let kills: u64 = std::env::var("ANNALS_RELAY_KILLS")
        .ok()
        .map(|value| value.parse().expect("ANNALS_RELAY_KILLS is a number"))
        .unwrap_or(3);
    let (stream_name, prefix) = unique("crash");
    let sink = JetStreamSink::new(context.clone(), &prefix).unwrap();
    // The window must outlast the whole run, so every re-publish is dropped.
    sink.ensure_stream(
        &JetStreamStream::new(&stream_name).duplicate_window(Duration::from_secs(600)),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("relay_survives_kill_9 seed={seed} kills={kills}");
    // Each run appends its share of the log; the killed ones do not finish.
    let per_run = 3_000;
    let target = per_run * (kills + 1);
    let dir_path = dir.path().to_owned();
    let prefix_for_children = prefix.clone();
    let done = tokio::task::spawn_blocking(move || {
        for kill in 0..kills {
            let delay = Duration::from_millis(150 + next(&mut seed) % 500);
            run_child(
                &dir_path,
                &prefix_for_children,
                per_run * (kill + 1),
                Some(delay),
            );
        }
        run_child(&dir_path, &prefix_for_children, target, None)
    })
    .await
    .unwrap();
    println!("relay_survives_kill_9 last run: {done}");
    assert!(
        done.starts_with("DONE"),
        "the last child did not finish: {done:?}"
    );

    let store = SledStore::open(dir.path()).unwrap();
    let log = read_log(&store).await;
    assert!(log.len() as u64 >= target);
    assert_eq!(
        store.load_checkpoint("relay:crash").await.unwrap(),
        Some(store.head_position()),
        "the clean shutdown saved the checkpoint at the head"
    );
    let seen = consume_all(&context, &stream_name).await;
    let counted = count(&log, &seen);
    println!(
        "relay published={} consumer_saw={} duplicates_seen={} missing={}",
        log.len(),
        counted.consumer_saw,
        counted.duplicates_seen,
        counted.missing
    );
    assert_eq!(
        counted,
        Count {
            consumer_saw: log.len(),
            duplicates_seen: 0,
            missing: 0,
            unknown: 0,
            out_of_order: 0
        }
    );
    store.shutdown().await.unwrap();
    context.delete_stream(&stream_name).await.unwrap();
}
