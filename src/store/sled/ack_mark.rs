//! The acknowledged mark: a small file beside sled's, `annals.acked`, that
//! holds the last position the writer acknowledged as durable, so that
//! opening can tell a log sled recovered whole from one it recovered
//! shorter after damage (docs/design.md, "The acknowledged mark").
//!
//! The mark is overwritten in place (one `pwrite` of 24 bytes) after each
//! group commit's fdatasync and before its answers, and is itself fsynced
//! only at shutdown: no second fsync per group. After a power cut the mark
//! may be older than the log (the check is then weaker, never wrong): it is
//! written only after the log's own sync, so it never runs ahead of what
//! the log made durable.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use tracing::warn;

use crate::error::StoreError;
use crate::event::Position;

/// The mark's file name in the store's directory.
pub(super) const FILE_NAME: &str = "annals.acked";

const MAGIC: &[u8; 8] = b"ANNALSAK";

/// The open mark file.
#[derive(Debug)]
pub(super) struct AckMark {
    file: File,
    /// The position last written.
    written: u64,
}

/// `MAGIC`, the position, and its complement (a torn or damaged mark does
/// not decode, and is then ignored: weaker, never a false alarm).
fn encode(position: u64) -> [u8; 24] {
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(MAGIC);
    bytes[8..16].copy_from_slice(&position.to_le_bytes());
    bytes[16..].copy_from_slice(&(!position).to_le_bytes());
    bytes
}

fn decode(bytes: &[u8]) -> Option<u64> {
    if bytes.len() < 24 || &bytes[..8] != MAGIC {
        return None;
    }
    let position = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    let check = u64::from_le_bytes(bytes[16..24].try_into().ok()?);
    (check == !position).then_some(position)
}

/// The position the mark in `dir` holds, if it has one that decodes.
pub(super) fn read(dir: &Path) -> Option<u64> {
    let bytes = match std::fs::read(dir.join(FILE_NAME)) {
        Ok(bytes) => bytes,
        // A store written before the mark existed, or a new one.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e,
                "the acknowledged mark cannot be read; opening without its check");
            return None;
        }
    };
    let position = decode(&bytes);
    if position.is_none() {
        warn!(dir = %dir.display(), "the acknowledged mark does not decode; ignored");
    }
    position
}

/// Refuses a log that sled recovered up to `head` when the mark in `dir`
/// says more was acknowledged, unless `accept`: the loss is then logged
/// (`doing` says what is under way) and the mark lowered to `head`,
/// durably (one write and one fdatasync). Returns the mark as it now
/// stands.
pub(super) fn check(
    dir: &Path,
    head: u64,
    accept: bool,
    doing: &str,
) -> Result<Option<u64>, StoreError> {
    let acknowledged = read(dir);
    if let Some(acknowledged) = acknowledged.filter(|&a| a > head) {
        if !accept {
            return Err(StoreError::ShorterThanAcknowledged {
                acknowledged: Position(acknowledged),
                recovered: Position(head),
            });
        }
        warn!(
            dir = %dir.display(), acknowledged, recovered = head,
            "{doing} a store that lost acknowledged events, as the config accepts"
        );
        AckMark::open(dir, head)?.record_durably(head)?;
        return Ok(Some(head));
    }
    Ok(acknowledged)
}

impl AckMark {
    /// Opens (or creates) the mark in `dir`, and sets it to `position`, the
    /// head the store opened with.
    pub(super) fn open(dir: &Path, position: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(FILE_NAME))?;
        let mut mark = Self { file, written: 0 };
        mark.record(position)?;
        Ok(mark)
    }

    /// Records `position` as acknowledged; not synced (see the module).
    pub(super) fn record(&mut self, position: u64) -> std::io::Result<()> {
        if position != self.written || position == 0 {
            self.file.write_all_at(&encode(position), 0)?;
            self.written = position;
        }
        Ok(())
    }

    /// Records `position` and makes the mark durable (at shutdown).
    pub(super) fn record_durably(&mut self, position: u64) -> std::io::Result<()> {
        self.record(position)?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_decodes_only_whole() {
        for position in [0, 1, 42, u64::MAX - 1] {
            assert_eq!(decode(&encode(position)), Some(position));
        }
        let mut damaged = encode(77);
        damaged[9] ^= 1;
        assert_eq!(decode(&damaged), None);
        assert_eq!(decode(&encode(77)[..20]), None);
        assert_eq!(decode(b"something else entirely"), None);
    }

    #[test]
    fn the_mark_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let mut mark = AckMark::open(dir.path(), 5).unwrap();
        assert_eq!(read(dir.path()), Some(5));
        mark.record(9).unwrap();
        assert_eq!(read(dir.path()), Some(9));
        mark.record_durably(12).unwrap();
        drop(mark);
        assert_eq!(read(dir.path()), Some(12));
    }
}
