//! A full disk (invariant I6): the store on a small tmpfs fills up; appends
//! fail with a typed error, nothing acknowledged is lost, and the store opens
//! again once space is freed. Needs root to mount a tmpfs; where mounting is
//! not permitted the test says so and checks nothing else.

use std::path::Path;
use std::process::Command;

use annals::{
    AppendError, EventFilter, EventStore, ExpectedVersion, NewEvent, Position, ReadDirection,
    SledStore, StoreError, StreamId,
};

struct Mount<'a>(&'a Path);

impl Mount<'_> {
    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}"), "tmpfs"])
            .arg(self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remounting the tmpfs failed");
    }
}

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

fn mount_tmpfs<'a>(path: &'a Path, size: &str) -> Option<Mount<'a>> {
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    mounted.then_some(Mount(path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_appends_with_a_typed_error_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mount) = mount_tmpfs(dir.path(), "6m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let path = dir.path().join("store");
    let store = SledStore::open(&path).unwrap();
    let stream = StreamId::new("disk-1").unwrap();
    let mut acknowledged = Vec::new();
    let error = loop {
        let event = NewEvent::new("Filled", vec![acknowledged.len() as u8; 16 * 1024]);
        let id = event.event_id;
        match store
            .append(&stream, ExpectedVersion::Any, vec![event])
            .await
        {
            Ok(_) => acknowledged.push(id),
            Err(error) => break error,
        }
        assert!(acknowledged.len() < 10_000, "a 6 MiB disk never filled up");
    };
    assert!(
        matches!(
            error,
            AppendError::Store(StoreError::Sled(_) | StoreError::Io(_) | StoreError::Poisoned(_))
        ),
        "{error:?}"
    );
    // Later appends keep failing with a typed error rather than hanging.
    let again = store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![NewEvent::new("Filled", vec![1])],
        )
        .await;
    assert!(matches!(again, Err(AppendError::Store(_))), "{again:?}");
    drop(store);

    mount.resize("64m");
    let store = SledStore::open(&path).expect("the store opens again once space is freed");
    let stored = store
        .read_all(
            Position::START,
            ReadDirection::Forward,
            usize::MAX,
            &EventFilter::All,
        )
        .await
        .unwrap();
    let stored_ids: Vec<_> = stored.iter().map(|e| e.event_id).collect();
    assert!(
        acknowledged.len() > 10,
        "only {} appends fit",
        acknowledged.len()
    );
    assert_eq!(
        &stored_ids[..acknowledged.len()],
        &acknowledged[..],
        "an acknowledged event was lost"
    );
    for (index, event) in stored.iter().enumerate() {
        assert_eq!(event.position.0, index as u64 + 1);
        assert_eq!(event.version.0, index as u64 + 1);
    }
    store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![NewEvent::new("Filled", vec![2])],
        )
        .await
        .expect("appends work again after space is freed");
    store.shutdown().await.unwrap();
}
