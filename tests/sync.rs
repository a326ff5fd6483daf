//! End-to-end sync between real agents on loopback: initial sync of a tree,
//! changes both ways, renames and edits that move few bytes, deletes kept in the
//! history, concurrent edits, catching up after being offline, resuming a pull
//! killed mid-way, folder types, and a missing folder root.

#[path = "common/agent.rs"]
mod agent;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use agent::{Agent, Lab, Node, PATIENCE, pair, pseudo_random, tree, two, wait_until};
use serde_json::Value;

/// `devices --json` entry of `peer` on `node`.
/// The content hashes of every version `node` keeps in its history of `folder`.
fn kept(node: &Node, folder: &str) -> Vec<String> {
    let v = node
        .run(&["history", &format!("{folder}:"), "--json"])
        .ok()
        .json();
    v["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("no versions list: {v}"))
        .iter()
        .filter_map(|v| v["hash"].as_str().map(str::to_owned))
        .collect()
}

fn hash_of(content: &[u8]) -> String {
    blake3::hash(content).to_hex().to_string()
}

fn peer_info(node: &Node, peer: &Node) -> Value {
    node.device(&peer.id()).expect("paired")
}

fn chunk_bytes_in(node: &Node, from: &Node) -> u64 {
    peer_info(node, from)["chunk_bytes_in"].as_u64().unwrap()
}

/// Writes `content` to `path` with mtime `secs` (Unix seconds).
fn write_at(path: &Path, content: &[u8], secs: u64) {
    fs::write(path, content).unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Waits until both trees are the same, naming the entries that still differ
/// if they never are.
#[track_caller]
fn wait_same(a: &Path, b: &Path) {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let (ta, tb) = (tree(a), tree(b));
        if ta == tb {
            return;
        }
        if std::time::Instant::now() >= deadline {
            let keys: std::collections::BTreeSet<&String> = ta.keys().chain(tb.keys()).collect();
            let diff: Vec<String> = keys
                .into_iter()
                .filter(|k| ta.get(*k) != tb.get(*k))
                .map(|k| format!("{k}: {:?} vs {:?}", ta.get(k), tb.get(k)))
                .collect();
            panic!(
                "gave up waiting until {} and {} hold the same tree; differing:\n{}",
                a.display(),
                b.display(),
                diff.join("\n")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_tree_syncs_and_changes_flow_both_ways() {
    let lab = Lab::new();
    let a = lab.node("a");
    let b = lab.node("b");
    let a_docs = a.add_folder("docs");
    // Nested and empty directories, a symlink, permissions, an old mtime.
    fs::create_dir_all(a_docs.join("sub/deeper")).unwrap();
    fs::create_dir_all(a_docs.join("empty")).unwrap();
    fs::write(a_docs.join("readme.txt"), b"hello\n").unwrap();
    fs::write(
        a_docs.join("sub/deeper/data.bin"),
        pseudo_random(700_000, 1),
    )
    .unwrap();
    fs::write(a_docs.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(a_docs.join("run.sh"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(a_docs.join("empty"), fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink("sub/deeper/data.bin", a_docs.join("link")).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_500_000_000);
    fs::File::options()
        .write(true)
        .open(a_docs.join("readme.txt"))
        .unwrap()
        .set_modified(old)
        .unwrap();

    let b_docs = b.path("docs");
    let (_aa, _ab) = (Agent::start(&a), Agent::start(&b));
    pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", b_docs.to_str().unwrap()],
    );
    wait_same(&a_docs, &b_docs);
    assert_eq!(tree(&b_docs).len(), 7, "{:#?}", tree(&b_docs));

    // B to A.
    fs::write(b_docs.join("from-b.txt"), b"written on b").unwrap();
    wait_until("A has B's new file", || {
        fs::read(a_docs.join("from-b.txt")).is_ok_and(|c| c == b"written on b")
    });

    // A rename moves no chunk data.
    let before = chunk_bytes_in(&b, &a);
    fs::rename(
        a_docs.join("sub/deeper/data.bin"),
        a_docs.join("sub/moved.bin"),
    )
    .unwrap();
    wait_until("B sees the rename", || {
        b_docs.join("sub/moved.bin").exists() && !b_docs.join("sub/deeper/data.bin").exists()
    });
    wait_same(&a_docs, &b_docs);
    assert_eq!(
        chunk_bytes_in(&b, &a),
        before,
        "a rename fetched chunk data"
    );

    // A delete reaches B, and B keeps what it deleted in its history.
    fs::remove_file(a_docs.join("readme.txt")).unwrap();
    wait_until("B deletes readme.txt", || {
        !b_docs.join("readme.txt").exists()
    });
    assert!(
        kept(&b, "docs").contains(&hash_of(b"hello\n")),
        "readme.txt not kept"
    );
    wait_same(&a_docs, &b_docs);
}

#[test]
fn an_insert_in_a_large_file_moves_only_a_few_chunks() {
    let lab = Lab::new();
    let (a, b, _aa, _ab, a_docs, b_docs) = two(&lab);
    let data = pseudo_random(24 * 1024 * 1024, 7);
    fs::write(a_docs.join("big.bin"), &data).unwrap();
    wait_same(&a_docs, &b_docs);
    let first = chunk_bytes_in(&b, &a);
    assert!(
        first >= data.len() as u64,
        "{first} bytes for the first copy"
    );

    let mut edited = data[..12_000_000].to_vec();
    edited.extend_from_slice(&[0xAB; 100]);
    edited.extend_from_slice(&data[12_000_000..]);
    fs::write(a_docs.join("big.bin"), &edited).unwrap();
    wait_same(&a_docs, &b_docs);
    let moved = chunk_bytes_in(&b, &a) - first;
    // The chunk the insert lands in and perhaps a neighbour: at most a few
    // maximum-size chunks (256 KiB), nothing like the 24 MiB file.
    assert!(
        moved > 0 && moved <= 4 * 256 * 1024,
        "{moved} chunk bytes moved for a 100-byte insert"
    );
}

#[test]
fn a_local_copy_source_damaged_behind_the_index_is_caught_and_repaired() {
    let lab = Lab::new();
    let (a, b, _aa, ab, a_docs, b_docs) = two(&lab);
    let data = pseudo_random(6 * 1024 * 1024, 11);
    fs::write(a_docs.join("x.bin"), &data).unwrap();
    wait_same(&a_docs, &b_docs);

    // B's copy of x.bin is damaged in place while its agent is stopped, with
    // size and mtime as before: its index still believes the old chunks.
    ab.stop();
    let x = b_docs.join("x.bin");
    let mtime = fs::metadata(&x).unwrap().modified().unwrap();
    let f = fs::File::options().write(true).open(&x).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 1000], 3_000_000).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let _ab = Agent::start(&b);

    // The same content under a new name: B copies it from x.bin locally, the
    // whole-file check fails, and the retry checks each chunk, fetching only
    // the damaged one from A.
    let before = chunk_bytes_in(&b, &a);
    fs::write(a_docs.join("y.bin"), &data).unwrap();
    wait_until("B has y.bin intact", || {
        fs::read(b_docs.join("y.bin")).is_ok_and(|c| c == data)
    });
    let moved = chunk_bytes_in(&b, &a) - before;
    assert!(
        moved > 0 && moved <= 2 * 256 * 1024,
        "{moved} chunk bytes fetched to repair one damaged chunk"
    );
}

#[test]
fn concurrent_edits_become_one_conflict_copy_and_an_offline_device_catches_up() {
    let lab = Lab::new();
    let (a, b, aa, ab, a_docs, b_docs) = two(&lab);
    fs::write(a_docs.join("notes.txt"), b"v1").unwrap();
    wait_same(&a_docs, &b_docs);

    // B goes offline; both edit the same file (B later), A also adds a file.
    ab.stop();
    fs::write(a_docs.join("notes.txt"), b"edited on a").unwrap();
    fs::write(a_docs.join("while-away.txt"), b"new on a").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    fs::write(b_docs.join("notes.txt"), b"edited on b, later").unwrap();
    // A's status says what the offline peer still lacks.
    let peer_of = |n: &Node| n.status()["folders"][0]["peers"][0].clone();
    wait_until("A counts what B lacks", || {
        peer_of(&a)["need_items"].as_u64() == Some(2)
    });
    let p = peer_of(&a);
    assert_eq!(p["name"], "b", "{p}");
    assert!(p["completion"].as_f64().unwrap() < 100.0, "{p}");
    assert!(
        a.run(&["status"]).ok().stdout.contains("2 items"),
        "the human status does not say what B lacks"
    );
    let _ab = Agent::start(&b);

    wait_until("B catches up with the file made while it was away", || {
        b_docs.join("while-away.txt").exists()
    });
    let copies = |root: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().contains(".sync-conflict-"))
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    wait_until("both hold one conflict copy", || {
        copies(&a_docs).len() == 1 && copies(&b_docs).len() == 1
    });
    wait_same(&a_docs, &b_docs);
    // The later edit wins; the earlier one is kept as the copy, everywhere.
    assert_eq!(
        fs::read(a_docs.join("notes.txt")).unwrap(),
        b"edited on b, later"
    );
    assert_eq!(copies(&a_docs)[0].1, b"edited on a");
    assert!(copies(&a_docs)[0].0.starts_with("notes.sync-conflict-"));
    assert!(copies(&a_docs)[0].0.ends_with(".txt"));
    for n in [&a, &b] {
        let list = n.run(&["conflicts", "--json"]).ok().json();
        assert_eq!(list.as_array().unwrap().len(), 1, "{}: {list}", n.name);
        assert_eq!(list[0]["path"], "notes.txt");
    }
    for (n, other) in [(&a, "b"), (&b, "a")] {
        wait_until("each side sees the other complete", || {
            let p = peer_of(n);
            p["name"] == other && p["completion"].as_f64() == Some(100.0)
        });
    }
    drop(aa);
}

#[test]
fn a_pull_killed_mid_way_resumes_with_what_it_had() {
    let lab = Lab::new();
    let a = lab.node("a");
    let b = lab.node("b");
    // One request at a time on B, so the pull takes long enough to interrupt.
    let config = b.home.join("config.toml");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        text.replace("requests_in_flight = 12", "requests_in_flight = 1"),
    )
    .unwrap();
    let a_docs = a.add_folder("docs");
    let data = pseudo_random(64 * 1024 * 1024, 3);
    fs::write(a_docs.join("large.bin"), &data).unwrap();
    let b_docs = b.path("docs");
    let aa = Agent::start(&a);
    let ab = Agent::start(&b);
    pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", b_docs.to_str().unwrap()],
    );
    // Kill B once a good part of the file is in its temp file (beside the
    // target, named `.ferry-tmp-*`).
    let temps = || -> Vec<String> {
        fs::read_dir(&b_docs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".ferry-tmp-"))
            .collect()
    };
    wait_until("B is half-way through the pull", || {
        chunk_bytes_in(&b, &a) > 16 * 1024 * 1024
    });
    ab.crash();
    assert!(
        !b_docs.join("large.bin").exists(),
        "the file was in place before it was complete"
    );
    assert_eq!(temps().len(), 1, "one partial file");

    let _ab = Agent::start(&b);
    wait_until("B finishes the file", || {
        fs::metadata(b_docs.join("large.bin")).is_ok_and(|m| m.len() == data.len() as u64)
    });
    assert_eq!(fs::read(b_docs.join("large.bin")).unwrap(), data);
    let second = chunk_bytes_in(&b, &a);
    assert!(
        second < data.len() as u64 - 8 * 1024 * 1024,
        "the second run fetched {second} bytes: it did not resume"
    );
    assert_eq!(temps(), Vec::<String>::new(), "temp file left");
    drop(aa);
}

#[test]
fn send_only_and_receive_only_folders() {
    let lab = Lab::new();
    let a = lab.node("a");
    let b = lab.node("b");
    let a_docs = a.folder_dir("docs");
    a.run(&[
        "folder",
        "add",
        a_docs.to_str().unwrap(),
        "--id",
        "docs",
        "--type",
        "send-only",
    ])
    .ok();
    fs::write(a_docs.join("a.txt"), b"from a").unwrap();
    let (_aa, _ab) = (Agent::start(&a), Agent::start(&b));
    let b_docs = b.path("docs");
    pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", b_docs.to_str().unwrap()],
    );
    wait_until("B has a.txt", || b_docs.join("a.txt").exists());

    // A is send-only: B's change is not applied on A, and A says why.
    fs::write(b_docs.join("b.txt"), b"from b").unwrap();
    wait_until("A lists b.txt as not applied", || {
        let need = a.run(&["status", "--need", "docs", "--json"]).ok().json();
        need["need"]
            .as_array()
            .is_some_and(|n| n.iter().any(|i| i["path"] == "b.txt"))
    });
    assert!(!a_docs.join("b.txt").exists());

    // A's own changes still go out.
    fs::write(a_docs.join("a2.txt"), b"more from a").unwrap();
    wait_until("B has a2.txt", || b_docs.join("a2.txt").exists());
}

#[test]
fn a_receive_only_folder_keeps_local_changes_to_itself_until_reverted() {
    let lab = Lab::new();
    let a = lab.node("a");
    let b = lab.node("b");
    let a_docs = a.add_folder("docs");
    fs::write(a_docs.join("shared.txt"), b"original").unwrap();
    let (_aa, _ab) = (Agent::start(&a), Agent::start(&b));
    let b_docs = b.path("docs");
    pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", b_docs.to_str().unwrap(), "--type", "receive-only"],
    );
    wait_until("B has shared.txt", || b_docs.join("shared.txt").exists());

    fs::write(b_docs.join("shared.txt"), b"changed on b").unwrap();
    fs::write(b_docs.join("local-only.txt"), b"b only").unwrap();
    // A marker change on A proves the link still works while B's stay home.
    fs::write(a_docs.join("marker.txt"), b"m").unwrap();
    wait_until("B has the marker", || b_docs.join("marker.txt").exists());
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(fs::read(a_docs.join("shared.txt")).unwrap(), b"original");
    assert!(!a_docs.join("local-only.txt").exists());

    b.run(&["revert", "docs"]).ok();
    wait_until("B's local changes are undone", || {
        fs::read(b_docs.join("shared.txt")).is_ok_and(|c| c == b"original")
            && !b_docs.join("local-only.txt").exists()
    });
    // Both local versions are kept in B's history.
    let kept = kept(&b, "docs");
    assert!(kept.contains(&hash_of(b"changed on b")), "{kept:?}");
    assert!(kept.contains(&hash_of(b"b only")), "{kept:?}");
}

#[test]
fn a_missing_folder_root_sends_no_deletes() {
    let lab = Lab::new();
    let (a, _b, aa, _ab, a_docs, b_docs) = two(&lab);
    fs::write(a_docs.join("keep.txt"), b"precious").unwrap();
    wait_same(&a_docs, &b_docs);

    // A's disk "unmounts" while its agent is down.
    aa.stop();
    let away = a.path("docs-unmounted");
    fs::rename(&a_docs, &away).unwrap();
    let _aa = Agent::start(&a);
    wait_until("A reports the folder in error", || {
        a.run(&["status", "--json"]).ok().json()["folders"][0]["state"] == "error"
    });
    // Give A's scans and links time to do harm if they were going to.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(fs::read(b_docs.join("keep.txt")).unwrap(), b"precious");
    let need = _b.run(&["status", "--json"]).ok().json();
    assert_eq!(need["folders"][0]["files"], 1, "{need}");
}

#[test]
fn three_devices_converge_and_a_conflict_makes_one_copy_everywhere() {
    let lab = Lab::new();
    let a = lab.node("a");
    let b = lab.node("b");
    let c = lab.node("c");
    let a_docs = a.add_folder("docs");
    fs::write(a_docs.join("shared.bin"), pseudo_random(3_000_000, 5)).unwrap();
    let (b_docs, c_docs) = (b.path("docs"), c.path("docs"));
    let (_aa, _ab, ac) = (Agent::start(&a), Agent::start(&b), Agent::start(&c));
    pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", b_docs.to_str().unwrap()],
    );
    pair(
        &a,
        &c,
        &["--folder", "docs"],
        &["--into", c_docs.to_str().unwrap()],
    );
    // B and C pair too and share docs with each other: a full mesh.
    pair(&b, &c, &[], &[]);
    b.run(&["share", "docs", &c.id()]).ok();
    c.run(&["share", "docs", &b.id()]).ok();
    wait_same(&a_docs, &b_docs);
    wait_same(&a_docs, &c_docs);

    // A change on B reaches both others.
    fs::write(b_docs.join("from-b.txt"), b"b").unwrap();
    wait_until("A and C have B's file", || {
        a_docs.join("from-b.txt").exists() && c_docs.join("from-b.txt").exists()
    });

    // C is away while A and B edit the same file; C catches up.
    ac.stop();
    fs::write(a_docs.join("from-b.txt"), b"a's edit").unwrap();
    wait_until("B has A's edit", || {
        fs::read(b_docs.join("from-b.txt")).is_ok_and(|c| c == b"a's edit")
    });
    fs::write(c_docs.join("from-b.txt"), b"c's edit, later").unwrap();
    let _ac = Agent::start(&c);
    let copies = |root: &Path| {
        fs::read_dir(root)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("sync-conflict")
            })
            .count()
    };
    wait_until("one conflict copy on every device", || {
        copies(&a_docs) == 1 && copies(&b_docs) == 1 && copies(&c_docs) == 1
    });
    wait_same(&a_docs, &b_docs);
    wait_same(&a_docs, &c_docs);
    assert_eq!(
        fs::read(a_docs.join("from-b.txt")).unwrap(),
        b"c's edit, later"
    );
}

#[test]
fn the_same_file_made_on_two_devices_apart_merges_with_the_newer_mtime() {
    let lab = Lab::new();
    let (a, b, aa, ab, a_docs, b_docs) = two(&lab);
    fs::write(a_docs.join("ready.txt"), b"linked").unwrap();
    wait_same(&a_docs, &b_docs);

    // While they are apart, both make the same file with different mtimes
    // and index it: concurrent versions of the same content.
    ab.stop();
    write_at(&a_docs.join("same.txt"), b"identical", 1_600_000_000);
    let files = |n: &Node| n.run(&["status", "--json"]).ok().json()["folders"][0]["files"].clone();
    wait_until("A indexed its file", || files(&a) == 2);
    aa.stop();
    write_at(&b_docs.join("same.txt"), b"identical", 1_700_000_000);
    let _ab = Agent::start(&b);
    wait_until("B indexed its file", || files(&b) == 2);
    let _aa = Agent::start(&a);

    // No conflict copy; both keep the newer mtime.
    wait_same(&a_docs, &b_docs);
    let mtime = fs::metadata(a_docs.join("same.txt")).unwrap().mtime();
    assert_eq!(mtime, 1_700_000_000);
    for root in [&a_docs, &b_docs] {
        let names: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains("sync-conflict")),
            "{names:?}"
        );
    }
}

#[test]
fn a_pull_that_finds_an_unscanned_file_in_its_way_leaves_no_temp_behind() {
    let lab = Lab::new();
    let a = lab.node("a");
    let b = lab.node("b");
    // A notices its own changes only after 3 s, so B's version of the same
    // new path arrives while A's file is on disk but not yet in its index.
    a.edit_config("debounce_ms = 200", "debounce_ms = 3000");
    let a_docs = a.add_folder("docs");
    let b_docs = b.path("docs");
    let (_aa, _ab) = (Agent::start(&a), Agent::start(&b));
    pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", b_docs.to_str().unwrap()],
    );
    fs::write(a_docs.join("ready.txt"), b"ready").unwrap();
    wait_until("B has ready.txt", || b_docs.join("ready.txt").exists());

    write_at(&a_docs.join("new.txt"), b"made on both", 1_600_000_000);
    write_at(&b_docs.join("new.txt"), b"made on both", 1_700_000_000);
    // The pull is refused (a local file in the way), A scans, and the two
    // versions, alike, merge: nothing else is pulled, so the temp file the
    // refused pull had filled must not stay behind.
    wait_same(&a_docs, &b_docs);
    for root in [&a_docs, &b_docs] {
        let temps: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".ferry-tmp"))
            .collect();
        assert!(temps.is_empty(), "{temps:?} in {}", root.display());
    }
}

#[test]
fn a_mass_delete_waits_for_confirmation_before_reaching_peers() {
    let lab = Lab::new();
    let (a, _b, _aa, _ab, a_docs, b_docs) = two(&lab);
    for i in 0..20 {
        fs::write(a_docs.join(format!("f{i:02}.txt")), format!("file {i}")).unwrap();
    }
    wait_same(&a_docs, &b_docs);

    // Most of the folder vanishes at once (an emptied disk?): held back.
    for i in 0..15 {
        fs::remove_file(a_docs.join(format!("f{i:02}.txt"))).unwrap();
    }
    wait_until("A reports held-back deletes", || {
        a.run(&["status", "--json"]).ok().json()["folders"][0]["held_deletes"] == 15
    });
    let human = a.run(&["status"]).ok();
    assert!(
        human.stdout.contains("confirm-deletes docs"),
        "status does not say what to do: {human}"
    );
    // A marker change proves the link works while the deletes stay home.
    fs::write(a_docs.join("marker.txt"), b"m").unwrap();
    wait_until("B has the marker", || b_docs.join("marker.txt").exists());
    assert!(b_docs.join("f00.txt").exists(), "a held delete reached B");

    let confirmed = a.run(&["folder", "confirm-deletes", "docs"]).ok();
    assert!(confirmed.stdout.contains("15 deletes"), "{confirmed}");
    wait_until("B applies the confirmed deletes", || {
        !b_docs.join("f00.txt").exists() && !b_docs.join("f14.txt").exists()
    });
    wait_same(&a_docs, &b_docs);
}

#[test]
fn out_of_inotify_watches_the_agent_says_so_and_still_syncs_by_scanning() {
    let lab = Lab::new();
    let a = lab.node("a");
    let b = lab.node("b");
    let a_docs = a.add_folder("docs");
    for i in 0..20 {
        fs::create_dir_all(a_docs.join(format!("d{i}"))).unwrap();
    }
    let b_docs = b.path("docs");
    let Some(_aa) = Agent::start_with_watch_limit(&a, 5) else {
        eprintln!("skipped: this machine has no user namespaces to limit inotify in");
        return;
    };
    let _ab = Agent::start(&b);
    pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", b_docs.to_str().unwrap()],
    );
    // The status names the limit and how to raise it.
    let notice = a.status()["folders"][0]["notice"].clone();
    let notice = notice.as_str().unwrap_or_default().to_owned();
    assert!(
        notice.contains("max_user_watches") && notice.contains("sysctl"),
        "notice: {notice:?}"
    );
    assert!(a.run(&["status"]).ok().stdout.contains("max_user_watches"));
    wait_same(&a_docs, &b_docs);
    // Changes are still noticed, by the periodic scans.
    fs::write(a_docs.join("d7/new.txt"), b"seen without a watcher").unwrap();
    wait_until("B gets the file A's periodic scan found", || {
        fs::read(b_docs.join("d7/new.txt")).is_ok_and(|c| c == b"seen without a watcher")
    });
}
