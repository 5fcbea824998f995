//! Crash safety (invariants I1 to I3) under real `kill -9`.
//!
//! The parent re-runs this test binary as a child that appends to a sled
//! store from many tasks and prints every acknowledged event as it is
//! acknowledged. The parent kills the child with SIGKILL at a random moment,
//! reopens the store and checks that every acknowledged event is there byte
//! for byte, that stream versions and `$all` positions have no gap and no
//! duplicate, then starts the child again on the same store.
//!
//! `ANNALS_CRASH_CYCLES=N cargo test --release --test crash -- --nocapture`
//! runs N cycles (default 4, a bounded run for CI).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use annals::{
    EventFilter, EventStore, ExpectedVersion, NewEvent, Position, ReadDirection, SledStore,
    StreamId, Version,
};
use uuid::Uuid;

const CHILD_DIR: &str = "ANNALS_CRASH_CHILD_DIR";
const CHILD_SEED: &str = "ANNALS_CRASH_CHILD_SEED";

/// The payload is a function of the event id, so the parent can check every
/// acknowledged event byte for byte without being told its payload.
fn payload_for(event_id: Uuid) -> Vec<u8> {
    let bytes = event_id.as_bytes();
    let len = 16 + (bytes[15] as usize % 8) * 97;
    (0..len).map(|i| bytes[i % 16] ^ (i as u8)).collect()
}

/// A tiny deterministic generator, so a failing cycle can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The child's role: append until killed, reporting each acknowledgement.
#[test]
#[ignore = "run by crash_cycles_lose_nothing as a child process"]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let seed: u64 = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = std::sync::Arc::new(SledStore::open(&dir).unwrap());
        let (acks, mut acked) = tokio::sync::mpsc::unbounded_channel::<String>();
        for task in 0..32u64 {
            let store = std::sync::Arc::clone(&store);
            let acks = acks.clone();
            tokio::spawn(async move {
                let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(task) | 1);
                loop {
                    let stream = StreamId::new(format!("crash-{}", rng.next() % 64)).unwrap();
                    let count = 1 + (rng.next() % 4) as usize;
                    let events: Vec<NewEvent> = (0..count)
                        .map(|_| {
                            let id = Uuid::now_v7();
                            NewEvent::new("Happened", payload_for(id)).with_id(id)
                        })
                        .collect();
                    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
                    if let Ok(done) = store.append(&stream, ExpectedVersion::Any, events).await {
                        for (offset, id) in ids.iter().enumerate() {
                            let version = done.first_version.0 + offset as u64;
                            let position = done.first_position.0 + offset as u64;
                            let _ = acks.send(format!("ACK {stream} {version} {position} {id}"));
                        }
                    }
                }
            });
        }
        drop(acks);
        // One printer, so lines never interleave; println! flushes per line
        // only on a terminal, so flush explicitly for the pipe.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        while let Some(line) = acked.recv().await {
            writeln!(out, "{line}").unwrap();
            out.flush().unwrap();
        }
    });
}

#[derive(Debug)]
struct Ack {
    stream: String,
    version: u64,
    position: u64,
}

/// Runs one child until a random moment, kills it, returns what it acked.
fn run_and_kill(dir: &Path, seed: u64, run_for: Duration) -> HashMap<Uuid, Ack> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_SEED, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
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
    // Wait for the first acknowledgement so every cycle kills mid-load, then
    // let it run for the random time.
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = std::iter::from_fn(|| {
        received
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    })
    .find(|line| line.contains("ACK "));
    std::thread::sleep(run_for);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    first
        .into_iter()
        .chain(received.try_iter())
        .filter_map(|line| {
            // libtest prints `test crash_child ... ` with no newline before
            // the child's own output, so a marker may start mid-line.
            let mut parts = line.split_once("ACK ")?.1.split(' ');
            let stream = parts.next()?.to_owned();
            let version = parts.next()?.parse().ok()?;
            let position = parts.next()?.parse().ok()?;
            let id = parts.next()?.parse().ok()?;
            Some((
                id,
                Ack {
                    stream,
                    version,
                    position,
                },
            ))
        })
        .collect()
}

#[derive(Debug, Default)]
struct Findings {
    checked: u64,
    lost: u64,
    gaps: u64,
    duplicates: u64,
}

async fn check_store(dir: &Path, acked: &HashMap<Uuid, Ack>, findings: &mut Findings) {
    let store = SledStore::open(dir).expect("the store reopens after kill -9");
    let head = store.head_position();
    let all = store
        .read_all(
            Position::START,
            ReadDirection::Forward,
            usize::MAX,
            &EventFilter::All,
        )
        .await
        .unwrap();
    // $all: positions 1..=head, each once.
    for (index, event) in all.iter().enumerate() {
        if event.position.0 != index as u64 + 1 {
            findings.gaps += 1;
        }
    }
    if all.len() as u64 != head.0 {
        findings.gaps += 1;
    }
    // Streams: versions 1..=n, each event id once.
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut ids = HashSet::new();
    for event in &all {
        versions
            .entry(event.stream_id.as_str())
            .or_default()
            .push(event.version.0);
        if !ids.insert(event.event_id) {
            findings.duplicates += 1;
        }
    }
    for (stream, versions) in &versions {
        let stream = StreamId::new(stream).unwrap();
        let head = store.stream_version(&stream).await.unwrap();
        if versions.iter().enumerate().any(|(i, v)| *v != i as u64 + 1)
            || head.0 != versions.len() as u64
        {
            findings.gaps += 1;
        }
    }
    // Every acknowledged event, byte for byte, where it was acknowledged.
    let by_id: HashMap<Uuid, &annals::RecordedEvent> =
        all.iter().map(|e| (e.event_id, e)).collect();
    for (id, ack) in acked {
        findings.checked += 1;
        let intact = by_id.get(id).is_some_and(|event| {
            event.stream_id.as_str() == ack.stream
                && event.version == Version(ack.version)
                && event.position == Position(ack.position)
                && event.event_type == "Happened"
                && event.payload == payload_for(*id)
        });
        if !intact {
            findings.lost += 1;
        }
    }
    // Appends continue with no gap and no reuse.
    let stream = StreamId::new("crash-check").unwrap();
    let before = store.stream_version(&stream).await.unwrap();
    let done = store
        .append(
            &stream,
            ExpectedVersion::Exact(before),
            vec![NewEvent::new("Checked", vec![])],
        )
        .await
        .unwrap();
    assert_eq!(done.first_position, head.next());
    assert_eq!(done.first_version, before.next());
    store.shutdown().await.unwrap();
}

#[test]
fn crash_cycles_lose_nothing() {
    let cycles: u64 = std::env::var("ANNALS_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut findings = Findings::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    for cycle in 0..cycles {
        let run_for = Duration::from_millis(rng.next() % 150);
        let acked = run_and_kill(dir.path(), cycle + 1, run_for);
        assert!(
            !acked.is_empty(),
            "cycle {cycle}: the child acknowledged nothing"
        );
        runtime.block_on(check_store(dir.path(), &acked, &mut findings));
        assert_eq!(
            (findings.lost, findings.gaps, findings.duplicates),
            (0, 0, 0),
            "cycle {cycle}: {findings:?}"
        );
    }
    println!(
        "crash_cycles={cycles} acknowledged_checked={} lost={} gaps={} duplicates={} ({:.1}s)",
        findings.checked,
        findings.lost,
        findings.gaps,
        findings.duplicates,
        started.elapsed().as_secs_f64()
    );
}
