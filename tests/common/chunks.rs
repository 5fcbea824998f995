//! The `log` tree's chunks (docs/design.md, "Tree `log`", format 3),
//! written from the documented layout, for tests that damage a store
//! behind its back: a chunk is the record count (u32 BE), each record's end
//! offset (u32 BE), then the records, under `C` + its first position.

#![allow(dead_code, unreachable_pub)]

/// The key of the chunk whose first event is at `first`.
pub fn chunk_key(first: u64) -> Vec<u8> {
    let mut key = vec![b'C'];
    key.extend_from_slice(&first.to_be_bytes());
    key
}

/// A chunk of the one record `record`.
pub fn single_chunk(record: &[u8]) -> Vec<u8> {
    [
        &1u32.to_be_bytes()[..],
        &(record.len() as u32).to_be_bytes(),
        record,
    ]
    .concat()
}

/// Every record of a `log` tree, in position order, out of its chunks.
pub fn stored_records(tree: &sled::Tree) -> Vec<Vec<u8>> {
    let word = |bytes: &[u8], at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    let mut records = Vec::new();
    for entry in tree.scan_prefix([b'C']) {
        let (_, chunk) = entry.unwrap();
        let count = word(&chunk, 0) as usize;
        let area = 4 + 4 * count;
        let mut start = 0;
        for index in 0..count {
            let end = word(&chunk, 4 + 4 * index) as usize;
            records.push(chunk[area + start..area + end].to_vec());
            start = end;
        }
    }
    records
}

/// Rewrites the log's records one to a chunk, `edit` choosing each one's
/// bytes (`None`: the position is left out, as a lost write would).
pub fn rewrite_records(tree: &sled::Tree, mut edit: impl FnMut(u64, Vec<u8>) -> Option<Vec<u8>>) {
    let records = stored_records(tree);
    for entry in tree.scan_prefix([b'C']) {
        tree.remove(entry.unwrap().0).unwrap();
    }
    for (position, record) in (1..).zip(records) {
        if let Some(bytes) = edit(position, record) {
            tree.insert(chunk_key(position), single_chunk(&bytes))
                .unwrap();
        }
    }
}

/// Rewrites the event-id index as formats 2 to 4 kept it, one `I` + id key
/// per event (value: its position), in place of format 5's runs (`J`
/// blocks, `K` summaries, `Mruns`): what staging an earlier format needs.
/// A record starts with its id, which postcard writes as a length (16)
/// and the 16 bytes.
pub fn ids_as_keys(tree: &sled::Tree) {
    for tag in [b'J', b'K'] {
        for key in tree.scan_prefix([tag]).keys() {
            tree.remove(key.unwrap()).unwrap();
        }
    }
    tree.remove(b"Mruns").unwrap();
    for (position, record) in (1u64..).zip(stored_records(tree)) {
        assert_eq!(record[0], 16, "a record starts with its 16-byte id");
        let mut key = vec![b'I'];
        key.extend_from_slice(&record[1..17]);
        tree.insert(key, &position.to_be_bytes()).unwrap();
    }
}
