//! Replays the fuzz seed corpus (and anything the fuzzers saved there) through
//! the same checks as the fuzz targets in `fuzz/fuzz_targets/`, so CI covers every
//! decoder of untrusted bytes without a fuzzer.

use std::fs;
use std::path::{Component, Path};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(inputs.len() >= 2, "{target}: seed corpus is missing");
    inputs.sort();
    inputs
}

#[test]
fn version_vectors_decode_or_fail_cleanly() {
    let mut decoded = 0;
    for input in corpus("version_vector") {
        if let Ok(v) = ferry::version_vector::VersionVector::decode(&input) {
            assert_eq!(v.encode(), input);
            decoded += 1;
        }
    }
    assert!(decoded >= 2);
}

#[test]
fn configs_parse_or_fail_cleanly() {
    let mut parsed = 0;
    for input in corpus("config") {
        if let Ok(text) = std::str::from_utf8(&input)
            && let Ok(c) = ferry::config::Config::from_toml_str(text)
        {
            let again = ferry::config::Config::from_toml_str(&c.to_commented_toml());
            assert_eq!(again.ok(), Some(c));
            parsed += 1;
        }
    }
    assert!(parsed >= 2);
}

#[test]
fn valid_relative_paths_stay_inside_the_folder() {
    let mut valid = 0;
    for input in corpus("relpath") {
        if let Ok(s) = std::str::from_utf8(&input)
            && let Ok(p) = ferry::relpath::RelPath::new(s)
        {
            let root = Path::new("/folder");
            let full = p.to_fs(root);
            assert!(full.starts_with(root));
            assert!(!full.starts_with(root.join(".ferry")));
            assert!(
                full.components()
                    .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            );
            valid += 1;
        }
    }
    assert!(valid >= 2);
}

#[test]
fn ignore_files_build_a_matcher_or_name_a_line() {
    let mut refused = 0;
    for input in corpus("ignore_file") {
        let text = String::from_utf8_lossy(&input);
        match ferry::scan::ignore_matcher(Path::new("/folder"), &text) {
            Ok(m) => {
                let _ = m.matched("a/b.txt", false);
            }
            Err((line, msg)) => {
                assert!(line >= 1 && !msg.is_empty());
                refused += 1;
            }
        }
    }
    assert!(refused >= 1, "the bad seed was accepted");
}

#[test]
fn invite_codes_decode_or_fail_cleanly() {
    use ferry::pairing::code::InviteCode;
    let mut decoded = 0;
    for input in corpus("invite_code") {
        if let Ok(text) = std::str::from_utf8(&input)
            && let Ok(c) = InviteCode::decode(text)
        {
            assert_eq!(InviteCode::decode(&c.encode()), Ok(c));
            decoded += 1;
        }
    }
    assert!(decoded >= 2, "the valid invite code seeds did not decode");
}

#[test]
fn wire_messages_decode_within_limits_or_fail_cleanly() {
    use ferry::protocol::{IndexMessage, Reply, Request, SyncMessage, decode, encode};
    let mut decoded = 0;
    let mut refused_paths = 0;
    for input in corpus("wire_messages") {
        if let Ok(m) = decode::<SyncMessage>(&input) {
            assert_eq!(decode::<SyncMessage>(&encode(&m)[4..]).ok(), Some(m));
            decoded += 1;
        }
        if let Ok(m) = decode::<Request>(&input) {
            assert_eq!(decode::<Request>(&encode(&m)[4..]).ok(), Some(m));
            decoded += 1;
        }
        if let Ok(m) = decode::<Reply>(&input) {
            assert_eq!(decode::<Reply>(&encode(&m)[4..]).ok(), Some(m));
            decoded += 1;
        }
        if let Ok(IndexMessage::Update { files, .. }) = decode::<IndexMessage>(&input) {
            decoded += 1;
            for f in files {
                let traversal = f.path.contains("..");
                let checked = ferry::sync::wire::from_wire(f);
                if traversal {
                    assert!(checked.is_err(), "a path with .. was accepted");
                    refused_paths += 1;
                }
            }
        }
    }
    assert!(decoded >= 14, "only {decoded} seeds decoded");
    assert!(refused_paths >= 1, "the hostile path seed was not refused");
}

#[test]
fn vault_items_open_only_when_intact() {
    use ferry::folder::FolderId;
    use ferry::vault::{
        ChunkId, FolderSecret, RecordId, open_chunk, open_record, seal_chunk, seal_record,
    };
    let keys = FolderSecret::from_bytes([0x42; 32]).keys();
    let folder = FolderId::new("fuzz").unwrap();
    let (mut chunks, mut records, mut codes, mut refused) = (0, 0, 0, 0);
    for input in corpus("vault_open") {
        let mut id = [0u8; 32];
        if let Some(bytes) = input.get(9..41) {
            id.copy_from_slice(bytes);
        }
        let chunk = open_chunk(&keys, &folder, &ChunkId(id), &input);
        if let Ok(plain) = &chunk {
            let again = seal_chunk(&keys, &folder, &blake3::hash(plain).into(), plain).unwrap();
            assert_eq!(again.id, ChunkId(id));
            chunks += 1;
        }
        let record = open_record(&keys, &folder, &RecordId(id), 0, &input);
        if let Ok(r) = &record {
            let again = seal_record(&keys, &folder, r).unwrap();
            let reopened = open_record(&keys, &folder, &again.id, r.revision, &again.bytes);
            assert_eq!(reopened.as_ref(), Ok(r));
            records += 1;
        }
        let code = std::str::from_utf8(&input)
            .ok()
            .map(FolderSecret::from_recovery_code);
        if let Some(Ok(secret)) = &code {
            let again = FolderSecret::from_recovery_code(&secret.recovery_code());
            assert_eq!(again.as_ref(), Ok(secret));
            codes += 1;
        }
        if chunk.is_err() && record.is_err() && !matches!(code, Some(Ok(_))) {
            refused += 1;
        }
    }
    assert!(chunks >= 2, "the sealed chunk seeds did not open");
    assert!(records >= 2, "the sealed record seeds did not open");
    assert!(codes >= 2, "the recovery code seeds did not parse");
    assert!(refused >= 4, "a damaged seed was accepted");
}
