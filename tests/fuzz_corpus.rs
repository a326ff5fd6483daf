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
