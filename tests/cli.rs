//! The `annals` command-line tool, run as the real binary against stores
//! the tests make: each command's output, `--json` parsed back, `verify`
//! catching a gap, a bad index entry and a corrupt record made through sled
//! directly, export -> import -> verify -> identical stats from sled to
//! PostgreSQL and back, resumed exports and imports, and refusals (a
//! locked store, a newer format, bad arguments, a missing confirmation)
//! with exit code 2, a message, and nothing written.

#[path = "common/chunks.rs"]
mod chunks;
mod pg_support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use annals::store::{Metadata, Snapshot};
use annals::{EventStore, ExpectedVersion, NewEvent, Position, SledStore, StreamId};
use serde_json::Value;
use uuid::Uuid;

fn annals(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_annals"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the annals binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the tool, expecting `code`; returns its standard output.
fn expect(code: i32, args: &[&str]) -> String {
    let output = annals(args);
    assert_eq!(
        output.status.code(),
        Some(code),
        "annals {args:?}\nstdout:\n{}\nstderr:\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Appends rounds of the test log: each round one event to each of 5
/// orders (with metadata), and in rounds 1 and 2 one to each of 2
/// customers.
async fn fill(store: &dyn EventStore, rounds: std::ops::RangeInclusive<u64>) {
    for round in rounds {
        for order in 1..=5u64 {
            let stream = StreamId::new(format!("order-{order}")).unwrap();
            let mut metadata = Metadata::new(Some(Uuid::from_u128(7)), None);
            metadata.extra.insert("tenant".into(), format!("t{order}"));
            let event = NewEvent::new(
                if round == 1 {
                    "OrderPlaced"
                } else {
                    "OrderShipped"
                },
                vec![order as u8, round as u8, 0xab],
            )
            .with_metadata(metadata);
            store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .unwrap();
        }
        if round <= 2 {
            for customer in 1..=2u64 {
                let stream = StreamId::new(format!("customer-{customer}")).unwrap();
                let event = NewEvent::new("CustomerSeen", vec![customer as u8; 40]);
                store
                    .append(&stream, ExpectedVersion::Any, vec![event])
                    .await
                    .unwrap();
            }
        }
    }
}

/// Events in a store made by `make_sled(_, 3)`: 15 order events, 4
/// customer events.
const EVENTS: u64 = 19;

async fn make_sled(dir: &Path, rounds: u64) {
    let store = SledStore::open(dir).unwrap();
    fill(&store, 1..=rounds).await;
    store
        .save_snapshot(
            &StreamId::new("order-1").unwrap(),
            Snapshot {
                version: annals::Version(2),
                payload: vec![1, 2],
            },
        )
        .await
        .unwrap();
    store
        .save_checkpoint("orders-view", Position(10))
        .await
        .unwrap();
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_streams_read_and_tail_print_tables_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    make_sled(&store, 3).await;
    let store = path_str(&store);

    let table = expect(0, &[store, "stats"]);
    assert!(
        table.contains(&format!("events        {EVENTS}")),
        "{table}"
    );
    assert!(table.contains("backend       sled (format"), "{table}");
    assert!(table.contains("orders-view"), "{table}");

    let stats = &json_lines(&expect(0, &[store, "--json", "stats"]))[0];
    assert_eq!(stats["events"], EVENTS);
    assert_eq!(stats["head"], EVENTS);
    assert_eq!(stats["streams"], 7);
    assert_eq!(stats["snapshots"], 1);
    assert_eq!(stats["categories"][0]["category"], "customer");
    assert_eq!(stats["categories"][0]["events"], 4);
    assert_eq!(stats["categories"][1]["category"], "order");
    assert_eq!(stats["categories"][1]["streams"], 5);
    assert_eq!(stats["checkpoints"][0]["name"], "orders-view");
    assert_eq!(stats["checkpoints"][0]["behind"], EVENTS - 10);
    assert!(stats["size_on_disk_bytes"].as_u64().unwrap() > 0);

    let streams = json_lines(&expect(
        0,
        &[store, "--json", "streams", "--category", "order"],
    ));
    assert_eq!(streams.len(), 5);
    assert_eq!(streams[1]["stream"], "order-2");
    assert_eq!(streams[1]["version"], 3);
    assert_eq!(streams[1]["last_event_type"], "OrderShipped");
    let limited = json_lines(&expect(0, &[store, "--json", "streams", "--limit", "2"]));
    assert_eq!(limited.len(), 2);

    let events = json_lines(&expect(0, &[store, "--json", "read", "order-2"]));
    let versions: Vec<u64> = events
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    assert_eq!(events[0]["event_type"], "OrderPlaced");
    assert_eq!(events[0]["payload_hex"], "0201ab");
    assert_eq!(events[0]["payload_len"], 3);
    assert_eq!(events[0]["extra"]["tenant"], "t2");
    assert_eq!(events[0]["correlation_id"], Uuid::from_u128(7).to_string());
    let newest = json_lines(&expect(
        0,
        &[
            store,
            "--json",
            "read",
            "order-2",
            "--backward",
            "--limit",
            "1",
        ],
    ));
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0]["version"], 3);
    let table = expect(0, &[store, "read", "order-2", "--from", "2"]);
    assert_eq!(
        table.lines().count(),
        3,
        "a header and two events:\n{table}"
    );
    assert!(table.contains("len=3 hex=0202ab"), "{table}");

    let seen = json_lines(&expect(
        0,
        &[store, "--json", "read-all", "--type", "CustomerSeen"],
    ));
    assert_eq!(seen.len(), 4);
    assert!(seen
        .iter()
        .all(|e| e["stream"].as_str().unwrap().starts_with("customer-")));
    let from = json_lines(&expect(0, &[store, "--json", "read-all", "--from", "18"]));
    let positions: Vec<u64> = from
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [18, 19]);

    let tail = json_lines(&expect(0, &[store, "--json", "tail", "-n", "3"]));
    let positions: Vec<u64> = tail
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [17, 18, 19]);
    let tail = json_lines(&expect(
        0,
        &[store, "--json", "tail", "-n", "2", "--category", "customer"],
    ));
    assert_eq!(tail.len(), 2);
    assert!(tail
        .iter()
        .all(|e| e["stream"].as_str().unwrap().starts_with("customer-")));

    let checkpoints = json_lines(&expect(0, &[store, "--json", "checkpoints"]));
    assert_eq!(checkpoints[0]["name"], "orders-view");
    assert_eq!(checkpoints[0]["position"], 10);
}

/// A copy of the store directory at `from`, with `damage` done to its `log`
/// tree through sled directly.
fn damaged_copy(from: &Path, to: &Path, damage: impl FnOnce(&sled::Tree)) {
    std::fs::create_dir_all(to).unwrap();
    copy_dir(from, to);
    let db = sled::open(to).unwrap();
    let log = db.open_tree("log").unwrap();
    damage(&log);
    db.flush().unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The frames of an export file, as (kind, body), after its 12-byte magic
/// and format version (the layout of `docs/design.md`, "Export files").
fn export_frames(file: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut at = 12;
    while at < file.len() {
        let kind = file[at];
        let length = u32::from_be_bytes(file[at + 1..at + 5].try_into().unwrap()) as usize;
        frames.push((kind, file[at + 5..at + 5 + length].to_vec()));
        at += 5 + length + 4;
    }
    assert_eq!(at, file.len(), "the last frame ends with the file");
    frames
}

fn stream_key(stream: &str, version: u64) -> Vec<u8> {
    let mut key = vec![b'S'];
    key.extend_from_slice(stream.as_bytes());
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// Points `stream`'s `version` at `position` in the stream index block
/// that holds it (a block holds a stream's consecutive versions from the
/// one in its key).
fn set_stream_entry(log: &sled::Tree, stream: &str, version: u64, position: u64) {
    let prefix = stream_key(stream, 0)[..stream.len() + 2].to_vec();
    let (key, value) = log
        .range(prefix.clone()..=stream_key(stream, version))
        .next_back()
        .expect("a block at or below the version")
        .unwrap();
    let first = u64::from_be_bytes(key[prefix.len()..].try_into().unwrap());
    let at = ((version - first) * 8) as usize;
    let mut value = value.to_vec();
    assert!(at + 8 <= value.len(), "the block holds version {version}");
    value[at..at + 8].copy_from_slice(&position.to_be_bytes());
    log.insert(key, value).unwrap();
}

fn violations(stdout: &str) -> Vec<Value> {
    json_lines(stdout)
        .into_iter()
        .filter(|line| line.get("violation").is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_passes_a_sound_store_and_reports_each_kind_of_damage() {
    let dir = tempfile::tempdir().unwrap();
    let sound = dir.path().join("sound");
    make_sled(&sound, 3).await;
    let report = expect(0, &[path_str(&sound), "verify"]);
    assert!(
        report.contains(&format!("checked {EVENTS} events")),
        "{report}"
    );
    assert!(report.contains("no violation"), "{report}");
    let summary = json_lines(&expect(0, &[path_str(&sound), "--json", "verify"]));
    assert_eq!(summary.last().unwrap()["sound"], true);
    // Three indexes entries per event: the stream index and the id index.
    assert_eq!(summary.last().unwrap()["index_entries"], 2 * EVENTS);

    // A gap: position 5 (customer-1 version 1... whichever it is) removed
    // without its index entries, as a lost write would leave it.
    let gap = dir.path().join("gap");
    damaged_copy(&sound, &gap, |log| {
        chunks::rewrite_records(log, |position, record| (position != 5).then_some(record));
    });
    let output = expect(1, &[path_str(&gap), "verify"]);
    assert!(
        output.contains("gap in the log: no event between positions 4 and 6"),
        "{output}"
    );
    let found = violations(&expect(1, &[path_str(&gap), "--json", "verify"]));
    assert!(found
        .iter()
        .any(|v| v["violation"] == "position_gap" && v["after"] == 4 && v["next"] == 6));
    // The stream and id index entries of position 5 now point at nothing.
    assert!(found.iter().any(|v| v["violation"] == "bad_index_entry"
        && v["index"] == "stream"
        && v["detail"].as_str().unwrap().contains("holds no event")));

    // A bad index entry: order-2 version 2 points at order-1's first event.
    let bad_index = dir.path().join("bad-index");
    damaged_copy(&sound, &bad_index, |log| {
        set_stream_entry(log, "order-2", 2, 1);
    });
    let output = expect(1, &[path_str(&bad_index), "verify"]);
    assert!(
        output.contains("stream index entry order-2 version 2: points at position 1, which holds order-1 version 1"),
        "{output}"
    );
    let found = violations(&expect(1, &[path_str(&bad_index), "--json", "verify"]));
    assert!(found
        .iter()
        .any(|v| v["violation"] == "not_indexed" && v["index"] == "stream"));
    assert!(found
        .iter()
        .any(|v| v["violation"] == "stream_read" && v["stream"] == "order-2"));
    assert!(!found.iter().any(|v| v["violation"] == "position_gap"));

    // A corrupt record: position 7's bytes replaced.
    let corrupt = dir.path().join("corrupt");
    damaged_copy(&sound, &corrupt, |log| {
        chunks::rewrite_records(log, |position, record| {
            Some(if position == 7 { vec![0xff; 5] } else { record })
        });
    });
    let output = expect(1, &[path_str(&corrupt), "verify"]);
    assert!(
        output.contains("the event at position 7 does not decode"),
        "{output}"
    );
    let found = violations(&expect(1, &[path_str(&corrupt), "--json", "verify"]));
    assert!(
        found.iter().all(|v| v["violation"] != "position_gap"),
        "{found:?}"
    );
    assert!(found
        .iter()
        .any(|v| v["violation"] == "undecodable_event" && v["position"] == 7));

    // A snapshot ahead of its stream.
    let ahead = dir.path().join("ahead");
    std::fs::create_dir_all(&ahead).unwrap();
    copy_dir(&sound, &ahead);
    {
        let store = SledStore::open(&ahead).unwrap();
        store
            .save_snapshot(
                &StreamId::new("customer-2").unwrap(),
                Snapshot {
                    version: annals::Version(9),
                    payload: vec![],
                },
            )
            .await
            .unwrap();
        store.shutdown().await.unwrap();
    }
    let found = violations(&expect(1, &[path_str(&ahead), "--json", "verify"]));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["violation"], "snapshot_ahead");
    assert_eq!(found[0]["stream_version"], 2);
}

/// The fields `stats` must carry over an export and import unchanged.
fn log_stats(store: &[&str]) -> Value {
    let mut args = store.to_vec();
    args.extend(["--json", "stats"]);
    let mut stats = json_lines(&expect(0, &args)).remove(0);
    for backend_specific in [
        "backend",
        "format_version",
        "size_on_disk_bytes",
        "snapshots",
        "checkpoints",
    ] {
        stats.as_object_mut().unwrap().remove(backend_specific);
    }
    stats
}

fn whole_log(store: &[&str]) -> Vec<Value> {
    let mut args = store.to_vec();
    args.extend(["--json", "read-all", "--limit", "100000"]);
    json_lines(&expect(0, &args))
}

#[tokio::test(flavor = "multi_thread")]
async fn export_import_carries_the_log_from_sled_to_postgres_and_back() {
    if pg_support::disabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    make_sled(&source, 3).await;
    let source = [path_str(&source)];
    let file = dir.path().join("log.annals");

    let exported = json_lines(&expect(
        0,
        &[source[0], "--json", "export", path_str(&file)],
    ));
    assert_eq!(exported[0]["events"], EVENTS);

    let url = pg_support::url();
    let schema = pg_support::fresh_schema();
    // Make sure the server is there (a missing one fails with how to start it).
    drop(pg_support::open(pg_support::config()));
    let pg = [url.as_str(), "--schema", schema.as_str()];
    let mut import_args = pg.to_vec();
    import_args.extend(["--json", "import", path_str(&file)]);
    let imported = json_lines(&expect(0, &import_args));
    assert_eq!(imported[0]["imported"], EVENTS);
    assert_eq!(imported[0]["head"], EVENTS);

    let mut verify = pg.to_vec();
    verify.push("verify");
    expect(0, &verify);
    assert_eq!(log_stats(&pg), log_stats(&source));
    // Every field of every event, payloads and timestamps included.
    assert_eq!(whole_log(&pg), whole_log(&source));

    // And back, from PostgreSQL into a new sled store.
    let back_file = dir.path().join("back.annals");
    let mut export_args = pg.to_vec();
    export_args.extend(["export", path_str(&back_file)]);
    expect(0, &export_args);
    let back = dir.path().join("back");
    expect(0, &[path_str(&back), "import", path_str(&back_file)]);
    expect(0, &[path_str(&back), "verify"]);
    let back = [path_str(&back)];
    assert_eq!(log_stats(&back), log_stats(&source));
    assert_eq!(whole_log(&back), whole_log(&source));

    // The copy goes on as a store: its next append continues the positions.
    let store = SledStore::open(back[0]).unwrap();
    let appended = store
        .append(
            &StreamId::new("order-1").unwrap(),
            ExpectedVersion::Exact(annals::Version(3)),
            vec![NewEvent::new("OrderClosed", vec![])],
        )
        .await
        .unwrap();
    assert_eq!(appended.first_position, Position(EVENTS + 1));
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_and_imports_resume_and_refuse_what_does_not_continue() {
    let dir = tempfile::tempdir().unwrap();
    let source_dir = dir.path().join("source");
    make_sled(&source_dir, 3).await;
    let source = path_str(&source_dir);
    let file = dir.path().join("log.annals");
    expect(0, &[source, "export", path_str(&file)]);
    let complete = std::fs::read(&file).unwrap();

    // An existing file is not overwritten without --resume.
    let output = annals(&[source, "export", path_str(&file)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("exists"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(std::fs::read(&file).unwrap(), complete);

    // An export killed part-way: the file cut inside a frame. --resume
    // continues it into the same bytes as a whole export.
    for cut in [complete.len() - 3, complete.len() / 2, 40] {
        let partial = dir.path().join(format!("partial-{cut}.annals"));
        std::fs::write(&partial, &complete[..cut]).unwrap();
        // Importing the partial file is refused, and writes nothing.
        let target = dir.path().join(format!("target-{cut}"));
        let output = annals(&[path_str(&target), "import", path_str(&partial)]);
        assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
        assert!(!target.exists(), "nothing created for a refused file");
        let resumed = json_lines(&expect(
            0,
            &[source, "--json", "export", "--resume", path_str(&partial)],
        ));
        assert_eq!(resumed[0]["events"], EVENTS);
        let resumed = std::fs::read(&partial).unwrap();
        assert_eq!(resumed.len(), complete.len());
        // Only the header's creation time may differ, and with it the
        // checksums over it: the events' frames are the same bytes, and
        // so is the trailer but for its whole-file checksum.
        let (resumed, whole) = (export_frames(&resumed), export_frames(&complete));
        assert_eq!(resumed.len(), whole.len());
        assert_eq!(resumed[1..resumed.len() - 1], whole[1..whole.len() - 1]);
        let (resumed_trailer, whole_trailer) =
            (&resumed[resumed.len() - 1], &whole[whole.len() - 1]);
        assert_eq!(resumed_trailer.0, b'T');
        assert_eq!(
            resumed_trailer.1[..resumed_trailer.1.len() - 4],
            whole_trailer.1[..whole_trailer.1.len() - 4]
        );
        expect(0, &[path_str(&target), "import", path_str(&partial)]);
        expect(0, &[path_str(&target), "verify"]);
        assert_eq!(whole_log(&[path_str(&target)]), whole_log(&[source]));
    }

    // A damaged byte: refused before anything is written.
    let mut damaged = complete.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    let damaged_file = dir.path().join("damaged.annals");
    std::fs::write(&damaged_file, &damaged).unwrap();
    let empty = dir.path().join("empty");
    let output = annals(&[path_str(&empty), "import", path_str(&damaged_file)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("damaged"),
        "{}",
        text(&output.stderr)
    );

    // A store with other events at the same positions: refused, unchanged.
    let other = dir.path().join("other");
    make_sled(&other, 1).await;
    let output = annals(&[path_str(&other), "import", path_str(&file)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("differs between the store and the file"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(log_stats(&[path_str(&other)])["head"], 7);

    // A log that grows: the first 7 events exported early, then all 19.
    let growing = dir.path().join("growing");
    let early = dir.path().join("early.annals");
    let full = dir.path().join("full.annals");
    {
        let store = SledStore::open(&growing).unwrap();
        fill(&store, 1..=1).await;
        store.shutdown().await.unwrap();
    }
    expect(0, &[path_str(&growing), "export", path_str(&early)]);
    let extended = dir.path().join("extended.annals");
    std::fs::copy(&early, &extended).unwrap();
    {
        let store = SledStore::open(&growing).unwrap();
        fill(&store, 2..=3).await;
        store.shutdown().await.unwrap();
    }
    expect(0, &[path_str(&growing), "export", path_str(&full)]);
    // A finished export extended with what the store committed since.
    let summary = json_lines(&expect(
        0,
        &[
            path_str(&growing),
            "--json",
            "export",
            "--resume",
            path_str(&extended),
        ],
    ));
    assert_eq!(summary[0]["events"], EVENTS);
    assert_eq!(summary[0]["written"], EVENTS - 7);

    // An interrupted import (the store holds the first 7): importing the
    // whole file resumes it; importing it again writes nothing.
    let target = dir.path().join("target");
    expect(0, &[path_str(&target), "import", path_str(&early)]);
    let resumed = json_lines(&expect(
        0,
        &[path_str(&target), "--json", "import", path_str(&full)],
    ));
    assert_eq!(resumed[0]["imported"], EVENTS - 7);
    assert_eq!(resumed[0]["already_present"], 7);
    let again = json_lines(&expect(
        0,
        &[path_str(&target), "--json", "import", path_str(&extended)],
    ));
    assert_eq!(again[0]["imported"], 0);
    assert_eq!(again[0]["already_present"], EVENTS);
    expect(0, &[path_str(&target), "verify"]);
    assert_eq!(
        whole_log(&[path_str(&target)]),
        whole_log(&[path_str(&growing)])
    );

    // A file that starts past the head: refused, nothing written; a store
    // whose head is just before it takes it.
    let later = dir.path().join("later.annals");
    expect(
        0,
        &[
            path_str(&growing),
            "export",
            "--from",
            "8",
            path_str(&later),
        ],
    );
    let fresh = dir.path().join("fresh");
    let output = annals(&[path_str(&fresh), "import", path_str(&later)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("must continue exactly at the store's head"),
        "{}",
        text(&output.stderr)
    );
    assert!(!fresh.exists(), "nothing created for a refused import");
    let continued = dir.path().join("continued");
    expect(0, &[path_str(&continued), "import", path_str(&early)]);
    let summary = json_lines(&expect(
        0,
        &[path_str(&continued), "--json", "import", path_str(&later)],
    ));
    assert_eq!(summary[0]["imported"], EVENTS - 7);
    expect(0, &[path_str(&continued), "verify"]);
    assert_eq!(
        whole_log(&[path_str(&continued)]),
        whole_log(&[path_str(&growing)])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_locked_store_a_newer_format_and_bad_arguments_are_refused_with_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    make_sled(&path, 3).await;
    let store_arg = path_str(&path);

    let file = dir.path().join("log.annals");
    expect(0, &[store_arg, "export", path_str(&file)]);
    // Locked: this process holds the store.
    let held = SledStore::open(&path).unwrap();
    for args in [
        vec![store_arg, "stats"],
        vec![store_arg, "verify"],
        vec![store_arg, "checkpoints", "delete", "orders-view", "--yes"],
    ] {
        let output = annals(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = text(&output.stderr);
        assert!(stderr.contains("is in use"), "{stderr}");
        assert!(
            stderr.contains(&format!("process {}", std::process::id())),
            "names the process holding it: {stderr}"
        );
        assert!(stderr.contains("Stop that process"), "{stderr}");
    }
    let output = annals(&[store_arg, "import", path_str(&file)]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        held.load_checkpoint("orders-view").await.unwrap(),
        Some(Position(10))
    );
    held.shutdown().await.unwrap();
    drop(held);

    // Bad arguments.
    for args in [
        vec![store_arg, "frobnicate"],
        vec![store_arg, "read"],
        vec![store_arg, "read", "$all"],
        vec![store_arg, "read-all", "--from", "minus-one"],
        vec![
            store_arg,
            "read-all",
            "--category",
            "order",
            "--type",
            "OrderPlaced",
        ],
        vec![store_arg, "checkpoints", "set", "orders-view", "3"],
        vec![store_arg, "checkpoints", "delete", "orders-view"],
        vec![
            store_arg,
            "checkpoints",
            "set",
            "orders-view",
            "999",
            "--yes",
        ],
    ] {
        let output = annals(&args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&output.stderr)
        );
        assert!(!output.stderr.is_empty(), "{args:?} says why");
    }
    // None of them wrote anything.
    let store = SledStore::open(&path).unwrap();
    assert_eq!(
        store.load_checkpoint("orders-view").await.unwrap(),
        Some(Position(10))
    );
    assert_eq!(store.head_position(), Position(EVENTS));
    store.shutdown().await.unwrap();
    drop(store);

    // A path that holds no store is not created.
    let missing = dir.path().join("missing");
    let output = annals(&[path_str(&missing), "stats"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("no annals store"));
    assert!(!missing.exists());

    // A store of a newer format is refused, and left as it was.
    let newer = dir.path().join("newer");
    std::fs::create_dir_all(&newer).unwrap();
    copy_dir(&path, &newer);
    {
        let db = sled::open(&newer).unwrap();
        db.open_tree("log")
            .unwrap()
            .insert("Mformat", &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let output = annals(&[path_str(&newer), "stats"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("format version 99"),
        "{}",
        text(&output.stderr)
    );
}

/// A store whose files went back to an older copy (a lost write) is
/// refused with exit code 2 and a pointer to `--accept-lost-events`, which
/// opens it as it is and lowers its acknowledged mark for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_shorter_than_acknowledged_opens_only_when_the_loss_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let older = dir.path().join("older");
    make_sled(&path, 3).await;
    std::fs::create_dir_all(&older).unwrap();
    copy_dir(&path, &older);
    let store = SledStore::open(&path).unwrap();
    fill(&store, 4..=4).await;
    let head = store.head_position();
    assert!(head > Position(EVENTS));
    store.shutdown().await.unwrap();
    // sled's files go back to the older copy; the mark stays.
    for entry in std::fs::read_dir(&path).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "annals.acked" {
            let target = entry.path();
            if target.is_dir() {
                std::fs::remove_dir_all(target).unwrap();
            } else {
                std::fs::remove_file(target).unwrap();
            }
        }
    }
    for entry in std::fs::read_dir(&older).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "annals.acked" && entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), path.join(entry.file_name())).unwrap();
        }
    }
    let store_arg = path_str(&path);
    let refused = annals(&[store_arg, "stats"]);
    assert_eq!(refused.status.code(), Some(2));
    let message = text(&refused.stderr);
    assert!(
        message.contains(&format!(
            "holds events up to position {EVENTS}, but it had acknowledged up to {}",
            head.0
        )) && message.contains("--accept-lost-events"),
        "{message}"
    );
    // Refused again: refusing wrote nothing.
    assert_eq!(annals(&[store_arg, "verify"]).status.code(), Some(2));
    let report = expect(0, &[store_arg, "--accept-lost-events", "verify"]);
    assert!(
        report.contains(&format!("checked {EVENTS} events")),
        "{report}"
    );
    // The loss is accepted for good: a plain open now succeeds.
    let stats = json_lines(&expect(0, &[store_arg, "--json", "stats"]));
    assert_eq!(stats[0]["head"], EVENTS);
}

/// A store written by the format-2 build (`tests/fixtures/format2`) is
/// refused with a pointer to `upgrade`, which moves it to format 3 in
/// place; it then verifies clean, and a second upgrade changes nothing.
#[test]
fn upgrade_moves_a_format_2_store_to_this_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    std::fs::create_dir_all(&path).unwrap();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format2/store"),
        &path,
    );
    let store = path_str(&path);
    let refused = annals(&[store, "stats"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("annals <store> upgrade"),
        "{}",
        text(&refused.stderr)
    );
    let upgraded = expect(0, &[store, "upgrade"]);
    assert!(
        upgraded.contains(&format!(
            "upgraded 500 events from format 2 to {}",
            annals::store::FORMAT_VERSION
        )),
        "{upgraded}"
    );
    let report = expect(0, &[store, "verify"]);
    assert!(report.contains("checked 500 events"), "{report}");
    assert!(report.contains("no violation"), "{report}");
    let stats = json_lines(&expect(0, &[store, "--json", "stats"]));
    assert_eq!(stats[0]["head"], 500);
    assert_eq!(stats[0]["format_version"], annals::store::FORMAT_VERSION);
    let again = json_lines(&expect(0, &[store, "--json", "upgrade"]));
    assert_eq!(again[0]["found_format"], annals::store::FORMAT_VERSION);
    assert_eq!(again[0]["chunks_written"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_are_set_and_deleted_only_when_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    make_sled(&path, 3).await;
    let store_arg = path_str(&path);
    let set = expect(
        0,
        &[store_arg, "checkpoints", "set", "orders-view", "3", "--yes"],
    );
    assert!(set.contains("orders-view: 10 -> 3"), "{set}");
    expect(
        0,
        &[store_arg, "checkpoints", "set", "new-view", "0", "--yes"],
    );
    let listed = json_lines(&expect(0, &[store_arg, "--json", "checkpoints"]));
    let names: Vec<(&str, u64)> = listed
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["position"].as_u64().unwrap()))
        .collect();
    assert_eq!(names, [("new-view", 0), ("orders-view", 3)]);
    let deleted = json_lines(&expect(
        0,
        &[
            store_arg,
            "--json",
            "checkpoints",
            "delete",
            "orders-view",
            "--yes",
        ],
    ));
    assert_eq!(deleted[0]["deleted"], true);
    let store = SledStore::open(&path).unwrap();
    assert_eq!(store.load_checkpoint("orders-view").await.unwrap(), None);
    assert_eq!(
        store.load_checkpoint("new-view").await.unwrap(),
        Some(Position(0))
    );
    store.shutdown().await.unwrap();
}

/// `tail --follow` on PostgreSQL prints the commits another process makes
/// while it runs.
#[tokio::test(flavor = "multi_thread")]
async fn tail_follows_another_process_commits_on_postgres() {
    if pg_support::disabled() {
        return;
    }
    let config = pg_support::config();
    let schema = config.schema.clone();
    let store = pg_support::open(config);
    fill(&store, 1..=1).await; // 7 events
    let mut child = Command::new(env!("CARGO_BIN_EXE_annals"))
        .args([
            &pg_support::url(),
            "--schema",
            &schema,
            "--json",
            "tail",
            "-n",
            "2",
            "--follow",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut positions = Vec::new();
    let next = |positions: &mut Vec<u64>| {
        // A bound so that a broken follow fails instead of hanging.
        let line = lines_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("tail printed the event");
        let event: Value = serde_json::from_str(&line).unwrap();
        positions.push(event["position"].as_u64().unwrap());
    };
    next(&mut positions);
    next(&mut positions);
    assert_eq!(positions, [6, 7]);
    // Committed by this process while the tool follows.
    fill(&store, 2..=2).await;
    for _ in 0..7 {
        next(&mut positions);
    }
    assert_eq!(positions, (6..=14).collect::<Vec<_>>());
    child.kill().unwrap();
    child.wait().unwrap();
    store.shutdown().await.unwrap();
}

/// `kill -9` of the tool in the middle of an export or an import: the
/// export resumes into a whole file, the import into the whole log, every
/// field equal to the source's. Where the kills land varies from run to
/// run; every outcome (nothing, part, all) must resume to the same end.
#[tokio::test(flavor = "multi_thread")]
async fn killed_exports_and_imports_resume_to_the_same_log() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let events = 20_000u64;
    {
        let store = SledStore::open(&source).unwrap();
        for batch in 0..events / 1000 {
            let stream = StreamId::new(format!("bulk-{}", batch % 7)).unwrap();
            let appended: Vec<NewEvent> = (0..1000u64)
                .map(|n| NewEvent::new("Filled", (batch * 1000 + n).to_be_bytes().repeat(12)))
                .collect();
            store
                .append(&stream, ExpectedVersion::Any, appended)
                .await
                .unwrap();
        }
        store.shutdown().await.unwrap();
    }
    let source = path_str(&source);
    let file = dir.path().join("bulk.annals");
    let target = dir.path().join("target");
    let kill_after = |args: &[&str], millis: u64| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_annals"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(millis));
        // SIGKILL: no chance to flush or clean up.
        let _ = child.kill();
        child.wait().unwrap()
    };
    for millis in [15, 40, 90] {
        kill_after(&[source, "export", "--resume", path_str(&file)], millis);
        let bytes = std::fs::metadata(&file).map_or(0, |m| m.len());
        eprintln!("export killed after {millis} ms: {bytes} bytes written");
    }
    let exported = json_lines(&expect(
        0,
        &[source, "--json", "export", "--resume", path_str(&file)],
    ));
    assert_eq!(exported[0]["events"], events);
    for millis in [15, 40, 90] {
        kill_after(&[path_str(&target), "import", path_str(&file)], millis);
        if target.join("db").exists() {
            let head = &log_stats(&[path_str(&target)])["head"];
            eprintln!("import killed after {millis} ms: the store's head is {head}");
        }
    }
    let imported = json_lines(&expect(
        0,
        &[path_str(&target), "--json", "import", path_str(&file)],
    ));
    assert_eq!(
        imported[0]["imported"].as_u64().unwrap()
            + imported[0]["already_present"].as_u64().unwrap(),
        events
    );
    assert_eq!(imported[0]["head"], events);
    expect(0, &[path_str(&target), "verify"]);
    assert_eq!(log_stats(&[path_str(&target)]), log_stats(&[source]));
    assert_eq!(whole_log(&[path_str(&target)]), whole_log(&[source]));
}
