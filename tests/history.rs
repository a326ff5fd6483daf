//! End-to-end history between real agents on loopback: restoring what a
//! remote overwrite or delete replaced (and the restore syncing back), a tree
//! restored as it was at a time with its deleted files, local versions, an
//! agent killed while it stores versions, bad input refused without changing
//! anything, and conflicts resolved each way.

#[path = "common/agent.rs"]
mod agent;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use agent::{Agent, Lab, Node, pseudo_random, two, wait_for, wait_until};
use serde_json::Value;

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Every file under `root` (outside `.ferry`) with its content.
fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == ".ferry" {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else if let Ok(bytes) = fs::read(&p) {
                // (A file gone since the listing is a sync in progress.)
                out.insert(rel, bytes);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[track_caller]
fn wait_same(a: &Path, b: &Path) {
    wait_until(
        &format!("{} and {} hold the same files", a.display(), b.display()),
        || files(a) == files(b),
    );
}

/// `ferry history PATH --json` on `node`.
fn history(node: &Node, path: &str) -> Value {
    node.run(&["history", path, "--json"]).ok().json()
}

/// `ferry history stats --json` on `node`.
fn stats(node: &Node) -> Value {
    node.run(&["history", "stats", "--json"]).ok().json()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One agent whose folder `docs` keeps local versions.
fn local_history(lab: &Lab) -> (Node, Agent, PathBuf) {
    let a = lab.node("a");
    a.edit_config("\nlocal = false\n", "\nlocal = true\n");
    let docs = a.add_folder("docs");
    let agent = Agent::start(&a);
    (a, agent, docs)
}

/// Waits until `node`'s store holds at least `bytes` of chunk data and nothing
/// waits to be stored.
fn wait_stored(node: &Node, bytes: u64) {
    wait_until(
        &format!("{}'s history store holds {bytes} bytes", node.name),
        || {
            let st = stats(node);
            st["store"]["chunk_bytes"].as_u64().unwrap() >= bytes
                && st["versions"]["pending"].as_u64().unwrap() == 0
        },
    );
}

#[test]
fn remote_overwrites_and_deletes_are_undone_by_a_restore_that_syncs() {
    let lab = Lab::new();
    let (_a, b, _aa, _ab, a_docs, b_docs) = two(&lab);
    let v1 = pseudo_random(900_000, 1);
    let v2 = pseudo_random(900_000, 2);
    fs::write(a_docs.join("report.bin"), &v1).unwrap();
    fs::write(a_docs.join("notes.txt"), b"keep me").unwrap();
    wait_same(&a_docs, &b_docs);

    // A overwrites: B keeps what it replaced, and moves it into its store.
    fs::write(a_docs.join("report.bin"), &v2).unwrap();
    wait_until("B has the overwrite", || {
        fs::read(b_docs.join("report.bin")).is_ok_and(|c| c == v2)
    });
    let b_report = b_docs.join("report.bin");
    let listed = wait_for("B stores the replaced version", || {
        let h = history(&b, s(&b_report));
        (h["versions"][0]["stored"] == true).then_some(h)
    });
    assert_eq!(listed["current"]["size"], 900_000);
    let old = &listed["versions"][0];
    assert_eq!(old["reason"], "replaced");
    assert_eq!(old["size"], 900_000);
    assert_eq!(old["hash"], blake3::hash(&v1).to_hex().as_str());
    assert_eq!(old["device"], "a");
    assert!(
        !b_docs
            .join(".ferry/versions")
            .read_dir()
            .unwrap()
            .any(|_| true)
    );
    let human = b.run(&["history", s(&b_report)]).ok();
    assert!(
        human.stdout.contains("current") && human.stdout.contains("replaced"),
        "{human}"
    );

    // B restores it in place: the exact bytes, and A gets them too.
    let id = old["id"].as_i64().unwrap().to_string();
    let run = b.run(&["restore", s(&b_report), "--version", &id]).ok();
    assert!(run.stdout.contains(&format!("version {id}")), "{run}");
    assert_eq!(fs::read(&b_report).unwrap(), v1);
    wait_until("A gets the restored version", || {
        fs::read(a_docs.join("report.bin")).is_ok_and(|c| c == v1)
    });
    let after = history(&b, "docs:report.bin");
    assert!(
        after["versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["reason"] == "restored-over"
                && v["hash"] == blake3::hash(&v2).to_hex().as_str()),
        "{after}"
    );

    // A deletes: B keeps it; restoring the newest version brings it back everywhere.
    fs::remove_file(a_docs.join("notes.txt")).unwrap();
    wait_until("B deletes notes.txt", || !b_docs.join("notes.txt").exists());
    let h = history(&b, s(&b_docs.join("notes.txt")));
    assert!(h["current"].is_null(), "{h}");
    assert_eq!(h["versions"][0]["reason"], "deleted");
    b.run(&["restore", s(&b_docs.join("notes.txt"))]).ok();
    assert_eq!(fs::read(b_docs.join("notes.txt")).unwrap(), b"keep me");
    wait_until("A gets notes.txt back", || {
        fs::read(a_docs.join("notes.txt")).is_ok_and(|c| c == b"keep me")
    });
    wait_same(&a_docs, &b_docs);
    b.run(&["history", "verify"]).ok();
}

/// `ferry ls docs PATH --json` on `node`: the entry of `path`, if listed.
fn ls_entry(node: &Node, path: &str) -> Option<Value> {
    let run = node.run(&["ls", "docs", path, "--json"]).ok();
    run.json()
        .as_array()
        .and_then(|l| l.iter().find(|e| e["path"] == path).cloned())
}

#[test]
fn ls_says_when_a_local_version_is_stored_so_that_an_edit_keeps_it() {
    let lab = Lab::new();
    let (a, _agent, docs) = local_history(&lab);
    fs::create_dir(docs.join("dir")).unwrap();
    let v1 = pseudo_random(300_000, 11);
    fs::write(docs.join("dir/a.bin"), &v1).unwrap();
    let hash = blake3::hash(&v1).to_hex().to_string();
    let stored = wait_for("ls says a.bin is stored", || {
        ls_entry(&a, "dir/a.bin").filter(|e| e["hash"] == hash.as_str() && e["stored"] == true)
    });
    assert_eq!(stored["size"], 300_000);
    let dir = ls_entry(&a, "dir").expect("dir is listed");
    assert_eq!(dir["stored"], false, "{dir}");

    // Stored, so a local edit keeps it; the new content is not stored yet
    // when it is first recorded, and is once the agent has read it.
    let v2 = pseudo_random(300_000, 13);
    fs::write(docs.join("dir/a.bin"), &v2).unwrap();
    let kept = wait_for("the replaced version is kept", || {
        let h = history(&a, "docs:dir/a.bin");
        h["versions"]
            .as_array()
            .and_then(|l| l.first().cloned())
            .filter(|v| v["reason"] == "local")
    });
    assert_eq!(kept["hash"], hash.as_str());
    let hash2 = blake3::hash(&v2).to_hex().to_string();
    wait_until("ls says the new content is stored", || {
        ls_entry(&a, "dir/a.bin")
            .is_some_and(|e| e["hash"] == hash2.as_str() && e["stored"] == true)
    });
    fs::remove_file(docs.join("dir/a.bin")).unwrap();
    wait_until("the deleted version is kept", || {
        history(&a, "docs:dir/a.bin")["versions"]
            .as_array()
            .is_some_and(|l| l.iter().any(|v| v["hash"] == hash2.as_str()))
    });
    let gone = a
        .run(&["ls", "docs", "dir/a.bin", "--deleted", "--json"])
        .ok();
    let entry = &gone.json()[0];
    assert_eq!(entry["deleted"], true, "{gone}");
    assert_eq!(entry["stored"], false, "{gone}");
}

#[test]
fn a_tree_comes_back_as_it_was_at_a_time_with_its_deleted_files() {
    let lab = Lab::new();
    let (a, _agent, docs) = local_history(&lab);
    let dir = docs.join("dir");
    fs::create_dir_all(dir.join("sub")).unwrap();
    let a1 = pseudo_random(200_000, 3);
    fs::write(dir.join("a.bin"), &a1).unwrap();
    fs::write(dir.join("b.txt"), b"bee").unwrap();
    fs::write(dir.join("sub/c.txt"), b"sea").unwrap();
    fs::write(docs.join("outside.txt"), b"not in dir").unwrap();
    wait_stored(&a, 200_000 + 3 + 3 + 10);
    let then = now_secs();
    std::thread::sleep(std::time::Duration::from_millis(1100));

    // Local edits, deletes and a new file; the replaced versions are kept.
    fs::write(dir.join("a.bin"), pseudo_random(200_000, 4)).unwrap();
    fs::remove_file(dir.join("b.txt")).unwrap();
    fs::remove_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("new.txt"), b"made later").unwrap();
    wait_until("the three replaced versions are kept", || {
        let h = history(&a, "docs:dir");
        h["versions"].as_array().unwrap().len() == 3
            && h["versions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v["reason"] == "local")
    });

    // To a new directory: the tree as it was, deleted files included.
    let dest = a.path("restored");
    let at = format!("@{then}");
    let run = a
        .run(&[
            "restore",
            "docs:dir",
            "--at",
            &at,
            "--recursive",
            "--to",
            s(&dest),
        ])
        .ok();
    assert!(run.stdout.contains("3 files"), "{run}");
    let expect = BTreeMap::from([
        ("a.bin".to_owned(), a1.clone()),
        ("b.txt".to_owned(), b"bee".to_vec()),
        ("sub/c.txt".to_owned(), b"sea".to_vec()),
    ]);
    assert_eq!(files(&dest), expect);

    // In place: the same, the file made later left alone and listed.
    let run = a
        .run(&["restore", s(&dir), "--at", &at, "--recursive", "--json"])
        .ok();
    let out = run.json();
    assert_eq!(out["restored"].as_array().unwrap().len(), 3, "{run}");
    assert_eq!(out["left"][0]["path"], "dir/new.txt", "{run}");
    let mut expect_now = expect.clone();
    expect_now.insert("new.txt".into(), b"made later".to_vec());
    assert_eq!(files(&dir), expect_now);
    // What the restore replaced is kept in turn.
    let h = history(&a, "docs:dir/a.bin");
    assert_eq!(h["versions"][0]["reason"], "restored-over");
    assert_eq!(fs::read(docs.join("outside.txt")).unwrap(), b"not in dir");
}

#[test]
fn an_agent_killed_while_storing_versions_leaves_a_consistent_history() {
    let lab = Lab::new();
    let (a, b, _aa, ab, a_docs, b_docs) = two(&lab);
    let old: Vec<Vec<u8>> = (0..3).map(|i| pseudo_random(12 << 20, 10 + i)).collect();
    for (i, d) in old.iter().enumerate() {
        fs::write(a_docs.join(format!("f{i}.bin")), d).unwrap();
    }
    wait_same(&a_docs, &b_docs);
    for i in 0..3 {
        fs::write(
            a_docs.join(format!("f{i}.bin")),
            pseudo_random(12 << 20, 20 + i),
        )
        .unwrap();
    }
    // Kill B while it writes a pack, once all three pulls have set the old
    // versions aside (or, if that moment passes unseen, once they are stored).
    let tmp = b.home.join("store/tmp");
    let b_versions = b_docs.join(".ferry/versions");
    let deadline = std::time::Instant::now() + agent::PATIENCE;
    let mut all_set_aside = false;
    loop {
        let set_aside = fs::read_dir(&b_versions).map_or(0, |d| d.count());
        all_set_aside |= set_aside == 3;
        let writing = fs::read_dir(&tmp).is_ok_and(|mut d| d.next().is_some());
        if (all_set_aside && (writing || set_aside == 0)) || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::yield_now();
    }
    let writing = fs::read_dir(&tmp).is_ok_and(|mut d| d.next().is_some());
    ab.crash();
    eprintln!("killed B while it wrote a pack: {writing}");

    // Whatever moment it died at, the history checks out and is complete.
    b.run(&["history", "verify"]).ok();
    let _ab = Agent::start(&b);
    wait_same(&a_docs, &b_docs);
    wait_until("B stores every replaced version", || {
        stats(&b)["versions"]["pending"] == 0
    });
    let run = b.run(&["history", "verify"]).ok();
    assert!(run.stdout.contains("No damage"), "{run}");
    let mut restored = 0;
    for (i, d) in old.iter().enumerate() {
        let h = history(&b, &format!("docs:f{i}.bin"));
        let Some(id) = h["versions"][0]["id"].as_i64() else {
            // Only a kill inside a pull's own transaction loses its version.
            continue;
        };
        let dest = b.path(&format!("out{i}.bin"));
        b.run(&[
            "restore",
            &format!("docs:f{i}.bin"),
            "--version",
            &id.to_string(),
            "--to",
            s(&dest),
        ])
        .ok();
        assert!(fs::read(&dest).unwrap() == *d, "f{i}.bin restored wrong");
        restored += 1;
    }
    assert!(restored >= 2, "only {restored} versions kept");
    drop(a);
}

#[test]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    let lab = Lab::new();
    let (a, agent, docs) = local_history(&lab);
    fs::write(docs.join("a.txt"), b"first").unwrap();
    wait_stored(&a, 5);
    fs::write(docs.join("a.txt"), b"second").unwrap();
    let id = wait_for("the first version is kept", || {
        history(&a, "docs:a.txt")["versions"][0]["id"].as_i64()
    })
    .to_string();
    let existing = a.path("existing.txt");
    fs::write(&existing, b"mine").unwrap();
    let missing = a.path("missing.txt");
    let snapshot = || (files(&docs), fs::read(&existing).unwrap(), missing.exists());
    let before = snapshot();

    let refused = |args: &[&str], needle: &str| {
        let run = a.run(args).exits(1);
        let line = run.error_line();
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
        assert_eq!(snapshot(), before, "`{}` changed something", args.join(" "));
    };
    refused(
        &["restore", "docs:nowhere.txt"],
        "no earlier versions of docs:nowhere.txt",
    );
    refused(
        &["restore", "/definitely/not/synced"],
        "not inside a synced folder",
    );
    refused(
        &["history", "docs:nowhere.txt"],
        "nothing is known of docs:nowhere.txt",
    );
    refused(
        &["restore", "docs:a.txt", "--version", "999"],
        "no version 999",
    );
    refused(
        &["restore", "docs:a.txt", "--at", "2001-01-01"],
        "no version of docs:a.txt was current at 2001-01-01 00:00:00 UTC",
    );
    refused(
        &[
            "restore",
            "docs:a.txt",
            "--version",
            &id,
            "--to",
            s(&existing),
        ],
        "already exists; pass --force",
    );
    let run = a
        .run(&["restore", "docs:a.txt", "--at", "last tuesday"])
        .exits(2);
    assert!(run.stderr.contains("invalid time"), "{run}");

    // A damaged pack: verify says so, restores fail cleanly.
    let pack = walk_files(&a.home.join("store/packs"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "pack"))
        .expect("a pack");
    let mut bytes = fs::read(&pack).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&pack, &bytes).unwrap();
    let run = a.run(&["history", "verify"]).exits(1);
    assert!(run.error_line().contains("damaged"), "{run}");
    refused(
        &[
            "restore",
            "docs:a.txt",
            "--version",
            &id,
            "--to",
            s(&missing),
        ],
        "cannot be read back intact",
    );
    refused(
        &["restore", "docs:a.txt", "--version", &id],
        "cannot be read back intact",
    );
    agent.stop();
    let run = a.run(&["restore", "docs:a.txt", "--version", &id]).exits(3);
    assert!(run.error_line().contains("not running"), "{run}");
    assert_eq!(fs::read(docs.join("a.txt")).unwrap(), b"second");
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The conflict copies in `root`, by name.
fn copies(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".sync-conflict-"))
        .collect();
    v.sort();
    v
}

#[test]
fn conflicts_are_resolved_each_way_and_the_copies_go_everywhere() {
    let lab = Lab::new();
    let (a, b, _aa, ab, a_docs, b_docs) = two(&lab);
    let names = ["k-local.txt", "k-remote.txt", "k-both.txt", "k-version.txt"];
    for n in names {
        fs::write(a_docs.join(n), b"v1").unwrap();
    }
    wait_same(&a_docs, &b_docs);
    // k-version.txt gets a second version, so B keeps the first.
    fs::write(a_docs.join("k-version.txt"), b"v2").unwrap();
    let v1 = wait_for("B keeps v1 of k-version.txt", || {
        history(&b, "docs:k-version.txt")["versions"][0]["id"].as_i64()
    });

    // B goes away; both edit every file, B later, so B's edits win.
    ab.stop();
    for n in names {
        fs::write(a_docs.join(n), b"a's edit").unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    for n in names {
        fs::write(b_docs.join(n), b"b's edit, later").unwrap();
    }
    let _ab = Agent::start(&b);
    wait_until("four conflict copies on both", || {
        copies(&a_docs).len() == 4 && copies(&b_docs).len() == 4
    });
    wait_same(&a_docs, &b_docs);

    // On A (whose versions became the copies).
    a.run(&["resolve", s(&a_docs.join("k-local.txt")), "--keep", "local"])
        .ok();
    assert_eq!(fs::read(a_docs.join("k-local.txt")).unwrap(), b"a's edit");
    let kept = history(&a, "docs:k-local.txt");
    assert_eq!(kept["versions"][0]["reason"], "conflict");
    a.run(&["resolve", "docs:k-remote.txt", "--keep", "remote"])
        .ok();
    assert_eq!(
        fs::read(a_docs.join("k-remote.txt")).unwrap(),
        b"b's edit, later"
    );
    // On B (whose versions stayed at the paths).
    b.run(&["resolve", "docs:k-both.txt", "--keep", "both"])
        .ok();
    b.run(&["resolve", "docs:k-version.txt", "--keep", &v1.to_string()])
        .ok();
    assert_eq!(fs::read(b_docs.join("k-version.txt")).unwrap(), b"v1");
    // Nothing left to resolve there.
    let run = b
        .run(&["resolve", "docs:k-both.txt", "--keep", "local"])
        .exits(1);
    assert!(run.error_line().contains("no open conflict"), "{run}");

    wait_until("the copies removed on one device are gone on both", || {
        copies(&a_docs).len() == 1 && copies(&b_docs).len() == 1
    });
    wait_same(&a_docs, &b_docs);
    assert!(copies(&a_docs)[0].starts_with("k-both.sync-conflict-"));
    let expect = [
        ("k-local.txt", &b"a's edit"[..]),
        ("k-remote.txt", b"b's edit, later"),
        ("k-both.txt", b"b's edit, later"),
        ("k-version.txt", b"v1"),
    ];
    for (n, content) in expect {
        assert_eq!(fs::read(b_docs.join(n)).unwrap(), content, "{n}");
    }
    let resolved = |n: &Node| {
        n.run(&["conflicts", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| !c["resolved_at"].is_null())
            .count()
    };
    assert_eq!((resolved(&a), resolved(&b)), (2, 2));
}

#[test]
fn a_local_overwrite_is_restored_from_the_history_a_peer_keeps() {
    let lab = Lab::new();
    let (a, b, _aa, ab, a_docs, b_docs) = two(&lab);
    let v1 = pseudo_random(900_000, 31);
    let v2 = pseudo_random(700_000, 32);
    fs::write(a_docs.join("report.bin"), &v1).unwrap();
    wait_same(&a_docs, &b_docs);

    // A overwrites locally (it keeps no local versions): the old bytes live on
    // only in B's history, kept when the change reached B.
    fs::write(a_docs.join("report.bin"), &v2).unwrap();
    wait_until("B has the overwrite", || {
        fs::read(b_docs.join("report.bin")).is_ok_and(|c| c == v2)
    });
    let b_id = b.id();
    let v1_hash = blake3::hash(&v1).to_hex().to_string();
    let listed = wait_for("A lists the version B keeps", || {
        let h = history(&a, "docs:report.bin");
        h["peer_versions"]
            .as_array()?
            .iter()
            .find(|v| v["hash"] == v1_hash.as_str())
            .cloned()
    });
    let h = history(&a, "docs:report.bin");
    assert!(h["versions"].as_array().unwrap().is_empty(), "{h}");
    assert!(h["peer_errors"].as_array().unwrap().is_empty(), "{h}");
    assert_eq!(listed["device_holding"], b_id.as_str());
    assert_eq!(listed["device_holding_name"], "b");
    assert_eq!(listed["reason"], "replaced");
    assert_eq!(listed["size"], 900_000);
    let id = listed["id"].as_i64().unwrap().to_string();
    let human = a.run(&["history", s(&a_docs.join("report.bin"))]).ok();
    assert!(
        human.stdout.contains("HELD BY") && human.stdout.contains("--from DEVICE"),
        "{human}"
    );

    // Bad input: one line, nothing changed.
    let refused = |args: &[&str], needle: &str| {
        let before = files(&a_docs);
        let run = a.run(args).exits(1);
        let line = run.error_line();
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
        assert!(
            files(&a_docs) == before,
            "`{}` changed A's folder",
            args.join(" ")
        );
    };
    refused(
        &[
            "restore",
            "docs:report.bin",
            "--version",
            "999999",
            "--from",
            "b",
        ],
        "b keeps no version 999999 of docs:report.bin",
    );
    refused(
        &[
            "restore",
            "docs:report.bin",
            "--version",
            &id,
            "--from",
            "nobody",
        ],
        "no paired device nobody",
    );
    let existing = a.path("existing.bin");
    fs::write(&existing, b"mine").unwrap();
    refused(
        &[
            "restore",
            "docs:report.bin",
            "--version",
            &id,
            "--from",
            "b",
            "--to",
            s(&existing),
        ],
        "already exists; pass --force",
    );
    assert_eq!(fs::read(&existing).unwrap(), b"mine");

    // To a new file: the exact old bytes.
    let out = a.path("out.bin");
    let run = a
        .run(&[
            "restore",
            "docs:report.bin",
            "--version",
            &id,
            "--from",
            &b_id,
            "--to",
            s(&out),
        ])
        .ok();
    assert!(run.stdout.contains("from b"), "{run}");
    assert_eq!(fs::read(&out).unwrap(), v1);

    // In place: A gets the exact old bytes back, keeps what it replaced, and
    // the restore syncs to B.
    let run = a
        .run(&[
            "restore",
            "docs:report.bin",
            "--version",
            &id,
            "--from",
            "b",
        ])
        .ok();
    assert!(run.stdout.contains("from b"), "{run}");
    assert_eq!(fs::read(a_docs.join("report.bin")).unwrap(), v1);
    let mine = history(&a, "docs:report.bin");
    assert_eq!(mine["versions"][0]["reason"], "restored-over", "{mine}");
    assert_eq!(
        mine["versions"][0]["hash"],
        blake3::hash(&v2).to_hex().as_str()
    );
    wait_until("B gets the restored version", || {
        fs::read(b_docs.join("report.bin")).is_ok_and(|c| c == v1)
    });
    wait_same(&a_docs, &b_docs);

    // B gone: its versions cannot be fetched, and listing still works.
    ab.stop();
    wait_until("A sees B gone", || !a.connected_to(&b_id));
    refused(
        &[
            "restore",
            "docs:report.bin",
            "--version",
            &id,
            "--from",
            "b",
        ],
        "b is not connected",
    );
    let h = history(&a, "docs:report.bin");
    assert!(h["peer_versions"].as_array().unwrap().is_empty(), "{h}");
}

#[test]
fn a_prune_killed_during_garbage_collection_leaves_a_consistent_store() {
    let lab = Lab::new();
    let (a, agent, docs) = local_history(&lab);
    // Ten versions of a file, each new content: about 80 MB in packs.
    let versions: Vec<Vec<u8>> = (0..10)
        .map(|i| pseudo_random(8 << 20, 301 + 2 * i)) // odd seeds: `seed | 1`
        .collect();
    let kept_now = || {
        let r = a.run(&["history", "docs:big.bin", "--json"]);
        if r.code != 0 {
            return 0;
        }
        r.json()["versions"].as_array().map_or(0, |l| l.len())
    };
    for (i, v) in versions.iter().enumerate() {
        // Swapped in whole, so the scanner never records a half-written one.
        let staged = a.path("staged.bin");
        fs::write(&staged, v).unwrap();
        fs::rename(&staged, docs.join("big.bin")).unwrap();
        // Each version is recorded (and so, once replaced, kept) before the
        // next is written.
        wait_until(&format!("version {i} is recorded"), || {
            let r = a.run(&["history", "docs:big.bin", "--json"]);
            r.code == 0
                && r.json()["current"]["hash"].as_str() == Some(blake3::hash(v).to_hex().as_str())
        });
        wait_until(&format!("{i} versions kept"), || kept_now() == i);
        // Local versions are kept from the store: let this one get there.
        wait_stored(&a, (i as u64 + 1) * (8 << 20));
    }
    agent.stop();
    // Age two versions in three past the default retention (365 days), so
    // the prune leaves packs mostly dead and GC rewrites them.
    let listed = history(&a, "docs:big.bin")["versions"].clone();
    let ids: Vec<i64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_i64().unwrap())
        .collect();
    let db = rusqlite::Connection::open(a.home.join("index.db")).unwrap();
    let aged: Vec<i64> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, id)| *id)
        .collect();
    for id in &aged {
        db.execute(
            "UPDATE history SET superseded_at = ?2 WHERE id = ?1",
            [*id, now_secs() - 400 * 86_400],
        )
        .unwrap();
    }
    drop(db);
    let before = stats(&a)["store"]["chunk_bytes"].as_u64().unwrap();

    // Kill the prune at moments spread over how long a whole one takes, each
    // time from the same starting state, and check the store after each.
    let pristine = a.path("pristine-home");
    let cp = |from: &Path, to: &Path| {
        let _ = fs::remove_dir_all(to);
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(ok.success());
    };
    cp(&a.home, &pristine);
    let prune = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("--home")
            .arg(&a.home)
            .args(["history", "prune"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let t = std::time::Instant::now();
    assert!(prune().wait().unwrap().success());
    let whole = t.elapsed();
    let mut kills = 0;
    for k in 1..=8u32 {
        cp(&pristine, &a.home);
        let mut child = prune();
        std::thread::sleep(whole * k / 9);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        let run = a.run(&["history", "verify"]);
        assert!(
            run.stdout.contains("No damage"),
            "after a kill at {k}/9 of {whole:?}: {run}"
        );
    }
    eprintln!("a whole prune took {whole:?}; killed {kills} of 8 before they finished");

    // A prune left to finish frees the aged versions' chunks; every version
    // kept still restores byte for byte.
    a.run(&["history", "prune"]).ok();
    a.run(&["history", "verify"]).ok();
    let after = stats(&a)["store"]["chunk_bytes"].as_u64().unwrap();
    assert!(
        after < before - 3 * (8 << 20),
        "GC freed too little: {before} -> {after}"
    );
    let kept = history(&a, "docs:big.bin")["versions"].clone();
    let kept = kept.as_array().unwrap();
    assert_eq!(kept.len(), ids.len() - aged.len(), "{kept:?}");
    for v in kept {
        let id = v["id"].as_i64().unwrap();
        let dest = a.path(&format!("restored-{id}"));
        a.run(&[
            "restore",
            "docs:big.bin",
            "--version",
            &id.to_string(),
            "--to",
            s(&dest),
        ])
        .ok();
        let got = fs::read(&dest).unwrap();
        assert!(
            versions.contains(&got),
            "version {id} restored bytes that were never written"
        );
        assert_eq!(
            blake3::hash(&got).to_hex().to_string(),
            v["hash"].as_str().unwrap(),
            "version {id}"
        );
    }
}
