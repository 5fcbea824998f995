//! Closes the gap between sled's flush and stable storage: the fdatasync
//! of sled's log file and the fsync of its blob files after each flush
//! (docs/design.md, "Durability").

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Counters, Durability};
use crate::error::StoreError;

/// Closes the gap between sled's flush and stable storage (sled issues
/// #1351, #1452): sled 0.34 flushes its log with `sync_file_range`, which
/// neither flushes the drive's cache nor the file's metadata, and writes
/// large pages to `blobs/` files it never syncs.
#[derive(Debug)]
pub(super) struct Syncer {
    pub(super) durability: Durability,
    db_file: Option<File>,
    blobs_dir: PathBuf,
    /// The largest blob id already synced; sled names blobs by increasing lsn.
    synced_blob: i64,
    pub(super) counters: Arc<Counters>,
}

impl Syncer {
    pub(super) fn new(
        path: &Path,
        durability: Durability,
        counters: Arc<Counters>,
    ) -> Result<Self, StoreError> {
        let db_file = match durability {
            Durability::Fsync => {
                // The directory entries of `db`, `conf` and `blobs` must be
                // durable too; they are created once, so sync the directory once.
                File::open(path)?.sync_all()?;
                Some(File::open(path.join("db"))?)
            }
            _ => None,
        };
        Ok(Self {
            durability,
            db_file,
            blobs_dir: path.join("blobs"),
            synced_blob: -1,
            counters,
        })
    }

    /// Makes what sled flushed durable.
    pub(super) fn sync(&mut self) -> std::io::Result<()> {
        let Some(db_file) = &self.db_file else {
            return Ok(());
        };
        let mut newest = self.synced_blob;
        for entry in std::fs::read_dir(&self.blobs_dir)? {
            let entry = entry?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i64>().ok())
            else {
                continue;
            };
            if id > self.synced_blob {
                match File::open(entry.path()) {
                    Ok(blob) => blob.sync_data()?,
                    // sled removed it since the listing (the page it held
                    // was rewritten or its key removed): nothing to sync.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                newest = newest.max(id);
            }
        }
        if newest > self.synced_blob {
            File::open(&self.blobs_dir)?.sync_all()?;
            self.synced_blob = newest;
        }
        db_file.sync_data()?;
        self.counters.durable_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
