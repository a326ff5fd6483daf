//! Any bytes from a backup holder either are refused by `open_chunk` and
//! `open_record` or open to an item that seals and opens back to itself; any text
//! either is refused as a recovery code or parses to a secret whose code parses
//! back to it. The ids asked for are the ones in the header, so the fuzzer gets
//! past the id check; the seeds in corpus/vault_open/ are sealed with the secret
//! below for folder `fuzz`.
#![no_main]
use ferry::folder::FolderId;
use ferry::vault::{
    ChunkId, FolderSecret, RecordId, open_chunk, open_record, seal_chunk, seal_record,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = FolderSecret::from_bytes([0x42; 32]).keys();
    let folder = FolderId::new("fuzz").expect("a valid folder id");
    let mut id = [0u8; 32];
    if let Some(bytes) = data.get(9..41) {
        id.copy_from_slice(bytes);
    }
    if let Ok(plain) = open_chunk(&keys, &folder, &ChunkId(id), data) {
        let hash = blake3::hash(&plain).into();
        let again = seal_chunk(&keys, &folder, &hash, &plain).expect("it opened, so it fits");
        assert_eq!(again.id, ChunkId(id));
        assert_eq!(
            open_chunk(&keys, &folder, &again.id, &again.bytes).ok(),
            Some(plain)
        );
    }
    if let Ok(record) = open_record(&keys, &folder, &RecordId(id), 0, data) {
        let again = seal_record(&keys, &folder, &record).expect("it opened, so it fits");
        assert_eq!(again.id, RecordId(id));
        let reopened = open_record(&keys, &folder, &again.id, record.revision, &again.bytes);
        assert_eq!(reopened.ok(), Some(record));
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(secret) = FolderSecret::from_recovery_code(text)
    {
        assert_eq!(
            FolderSecret::from_recovery_code(&secret.recovery_code()).ok(),
            Some(secret)
        );
    }
});
