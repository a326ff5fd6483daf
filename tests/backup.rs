//! Encrypted backups end to end, between real agents on loopback: a folder
//! held by a device that can read none of it, changes reaching it in the
//! background, recovery onto a fresh device byte for byte, and a wrong key or
//! altered bytes refused.

#[path = "common/agent.rs"]
mod agent;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use agent::{Agent, Lab, Node, Run, pair, pseudo_random, tree, wait_until};
use serde_json::Value;

/// Every file under `dir`, as bytes.
fn all_bytes(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            all_bytes(&p, out);
        } else if m.is_file() {
            out.push((p.display().to_string(), fs::read(&p).unwrap()));
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn status(node: &Node) -> Value {
    node.run(&["status", "--json"]).ok().json()
}

/// Whether every holder of A's folder is up to date, and the holder has it.
fn held(a: &Node, h: &Node) -> bool {
    let s = status(a);
    let f = &s["folders"][0];
    let up = f["holders"]
        .as_array()
        .is_some_and(|hs| !hs.is_empty() && hs.iter().all(|h| h["up_to_date"] == true));
    let records = status(h)["vaults"][0]["records"].as_u64().unwrap_or(0);
    up && records > 0
}

/// The recovery code of `folder` on `node` (`ferry folder key`).
fn key_of(node: &Node, folder: &str) -> String {
    node.run(&["folder", "key", folder])
        .ok()
        .stdout
        .trim()
        .to_owned()
}

/// `ferry recover` on `node` from `holder` with `key` into `into`.
fn recover(node: &Node, holder: &Node, key: &str, into: &Path) -> Run {
    node.run(&[
        "recover",
        "--from",
        &holder.id(),
        "--key",
        key,
        "--into",
        into.to_str().unwrap(),
    ])
}

#[test]
fn a_holder_keeps_a_folder_it_cannot_read_and_a_fresh_device_recovers_it() {
    let lab = Lab::new();
    let a = lab.node("a");
    let h = lab.node("h");
    let c = lab.node("c");
    let docs = a.add_folder("docs");
    fs::create_dir_all(docs.join("private-plans/deeper")).unwrap();
    fs::write(
        docs.join("private-plans/secret-names.txt"),
        b"ALPHA-MARKER-7731 meeting with zebra",
    )
    .unwrap();
    let big = pseudo_random(3_000_000, 21);
    fs::write(docs.join("private-plans/deeper/big.bin"), &big).unwrap();
    fs::write(
        docs.join("script.sh"),
        b"#!/bin/sh\necho BRAVO-MARKER-5519\n",
    )
    .unwrap();
    fs::set_permissions(docs.join("script.sh"), fs::Permissions::from_mode(0o751)).unwrap();
    std::os::unix::fs::symlink("private-plans/secret-names.txt", docs.join("link-to-names"))
        .unwrap();
    let (_aa, ah) = (Agent::start(&a), Agent::start(&h));

    // The holder joins with an encrypted invite: it keeps the folder sealed.
    pair(&a, &h, &["--folder", "docs", "--encrypted"], &[]);
    wait_until("the holder has the whole folder", || held(&a, &h));
    let v = &status(&h)["vaults"][0];
    assert_eq!(v["folder"], "docs");
    assert_eq!(v["encrypted"], true);
    assert!(v["bytes"].as_u64().unwrap() >= big.len() as u64, "{v}");
    assert!(
        h.folders().is_empty(),
        "the holder has no folder of its own"
    );

    // A change reaches the holder in the background.
    fs::write(docs.join("later.txt"), b"CHARLIE-MARKER-2208").unwrap();
    wait_until("the holder has the change", || {
        held(&a, &h) && status(&h)["vaults"][0]["records"].as_u64() >= Some(7)
    });

    // Nothing the holder stores or logs names or shows the folder's contents.
    ah.stop();
    let mut files = Vec::new();
    all_bytes(&h.dir, &mut files);
    assert!(!files.is_empty());
    let secrets: [&[u8]; 7] = [
        b"ALPHA-MARKER-7731",
        b"BRAVO-MARKER-5519",
        b"CHARLIE-MARKER-2208",
        b"secret-names",
        b"private-plans",
        b"later.txt",
        &big[1_000_000..1_000_064],
    ];
    for (path, bytes) in &files {
        for s in secrets {
            assert!(
                !contains(bytes, s),
                "{path} holds {:?}",
                String::from_utf8_lossy(&s[..s.len().min(20)])
            );
        }
    }
    let _ah = Agent::start(&h);

    // A fresh device pairs with the holder and recovers the folder with the
    // recovery code, byte for byte.
    let key = key_of(&a, "docs");
    let _ac = Agent::start(&c);
    pair(&h, &c, &[], &[]);
    let into = c.path("restored");
    let run = recover(&c, &h, &key, &into).ok();
    assert!(run.stdout.contains("Recovered folder docs"), "{run}");
    assert_eq!(tree(&into), tree(&docs));
    // It is an ordinary folder there now.
    assert_eq!(c.folders()[0]["id"], "docs");

    // A key for another folder opens nothing on the holder.
    a.add_folder("other");
    let wrong = key_of(&a, "other");
    let into2 = c.path("wrong");
    let run = recover(&c, &h, &wrong, &into2);
    assert_ne!(run.code, 0, "{run}");
    assert!(
        run.stderr.contains("opens with this recovery code"),
        "{run}"
    );
    assert!(!into2.join("private-plans").exists());
}

/// The sealed records the holder stores: (row id, bytes).
fn sealed_records(db: &rusqlite::Connection) -> Vec<(i64, Vec<u8>)> {
    db.prepare("SELECT id, bytes FROM vault_records ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn set_record(db: &rusqlite::Connection, id: i64, bytes: &[u8]) {
    db.execute(
        "UPDATE vault_records SET bytes = ?2 WHERE id = ?1",
        rusqlite::params![id, bytes],
    )
    .unwrap();
}

/// Where the holder's chunk store keeps the pack called `name`.
fn pack_file(h: &Node, name: &str) -> std::path::PathBuf {
    h.home
        .join("store/packs")
        .join(&name[..2])
        .join(format!("{name}.pack"))
}

/// The sealed chunks the holder stores, read from its chunk store's packs:
/// (keyed id, bytes).
fn sealed_chunks(h: &Node, db: &rusqlite::Connection) -> Vec<(Vec<u8>, Vec<u8>)> {
    let rows: Vec<(Vec<u8>, String, i64, i64)> = db
        .prepare(
            "SELECT v.chunk, p.name, s.offset, s.length FROM vault_stored v
             JOIN store_chunks s ON s.hash = v.hash JOIN store_packs p ON p.id = s.pack
             ORDER BY v.chunk",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows.into_iter()
        .map(|(id, name, offset, length)| {
            let pack = fs::read(pack_file(h, &name)).unwrap();
            let at = offset as usize + 36;
            (id, pack[at..at + length as usize].to_vec())
        })
        .collect()
}

/// The pack that holds chunk `id`.
fn pack_of(db: &rusqlite::Connection, id: &[u8]) -> String {
    db.query_row(
        "SELECT p.name FROM vault_stored v JOIN store_chunks s ON s.hash = v.hash
         JOIN store_packs p ON p.id = s.pack WHERE v.chunk = ?1",
        [id],
        |r| r.get(0),
    )
    .unwrap()
}

/// Makes the holder serve `bytes` for chunk `id`, as a holder tampering with
/// its own store would: a pack of its making (in the store's format) with the
/// store's rows pointing there, so that only the reader's checks can tell.
fn set_chunk(h: &Node, db: &rusqlite::Connection, id: &[u8], bytes: &[u8]) {
    let hash = blake3::hash(bytes);
    let name = blake3::hash(&[hash.as_bytes(), id].concat()).to_hex()[..32].to_string();
    let mut pack = b"FERRYPK1\x01".to_vec();
    pack.extend_from_slice(hash.as_bytes());
    pack.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    pack.extend_from_slice(bytes);
    let path = pack_file(h, &name);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, &pack).unwrap();
    db.execute(
        "INSERT OR IGNORE INTO store_packs (name, size, created_at) VALUES (?1, ?2, 0)",
        rusqlite::params![name, pack.len() as i64],
    )
    .unwrap();
    db.execute(
        "INSERT OR REPLACE INTO store_chunks (hash, pack, offset, length)
         SELECT ?1, id, 9, ?2 FROM store_packs WHERE name = ?3",
        rusqlite::params![&hash.as_bytes()[..], bytes.len() as i64, name],
    )
    .unwrap();
    db.execute(
        "UPDATE vault_stored SET hash = ?1, length = ?2 WHERE chunk = ?3",
        rusqlite::params![&hash.as_bytes()[..], bytes.len() as i64, id],
    )
    .unwrap();
}

#[test]
fn altered_truncated_or_swapped_bytes_on_the_holder_are_refused_naming_it() {
    let lab = Lab::new();
    let a = lab.node("a");
    let h = lab.node("h");
    let c = lab.node("c");
    let docs = a.add_folder("docs");
    fs::write(docs.join("one.bin"), pseudo_random(400_000, 3)).unwrap();
    let (_aa, _ah) = (Agent::start(&a), Agent::start(&h));
    pair(&a, &h, &["--folder", "docs", "--encrypted"], &[]);
    wait_until("the holder has the folder", || held(&a, &h));
    let key = key_of(&a, "docs");
    let _ac = Agent::start(&c);
    pair(&h, &c, &[], &[]);

    // The holder's store changed behind its back, one way at a time.
    let db = rusqlite::Connection::open(h.home.join("index.db")).unwrap();
    let chunks = sealed_chunks(&h, &db);
    assert!(chunks.len() >= 2, "{} chunks", chunks.len());
    let records = sealed_records(&db);
    let (c0, c1, r0) = (&chunks[0], &chunks[1], &records[0]);
    let flip = |b: &[u8]| {
        let mut b = b.to_vec();
        b[100] ^= 0x55;
        b
    };
    type Tamper<'a> = (&'a str, &'a str, Box<dyn Fn(&rusqlite::Connection) + 'a>);
    let cases: Vec<Tamper> = vec![
        (
            "altered chunk",
            "altered",
            Box::new(|db| {
                for (id, b) in &chunks {
                    set_chunk(&h, db, id, &flip(b));
                }
            }),
        ),
        (
            "truncated chunk",
            "cut short",
            Box::new(|db| {
                for (id, b) in &chunks {
                    set_chunk(&h, db, id, &b[..b.len() - 7]);
                }
            }),
        ),
        (
            "swapped chunks",
            "swapped",
            Box::new(|db| {
                set_chunk(&h, db, &c0.0, &c1.1);
                set_chunk(&h, db, &c1.0, &c0.1);
            }),
        ),
        (
            "altered record",
            "altered",
            Box::new(|db| set_record(db, r0.0, &flip(&r0.1))),
        ),
        (
            "a chunk the holder's store cannot read back",
            "store failed",
            Box::new(|_| {
                // Rotted on the holder's disk: its own check finds it.
                let name = pack_of(&db, &c0.0);
                let path = pack_file(&h, &name);
                let mut pack = fs::read(&path).unwrap();
                let last = pack.len() - 1;
                pack[last] ^= 0xff;
                fs::write(&path, pack).unwrap();
            }),
        ),
    ];
    for (n, (what, says, tamper)) in cases.iter().enumerate() {
        tamper(&db);
        let into = c.path(&format!("restored-{n}"));
        let run = recover(&c, &h, &key, &into);
        assert_ne!(run.code, 0, "{what}: {run}");
        assert!(
            run.stderr.contains(&h.id()) && run.stderr.contains(says),
            "{what}: {run}"
        );
        // Nothing half-written is left in place.
        let left = fs::read_dir(&into).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "{what}: files left in {}", into.display());
        for (id, b) in &chunks {
            set_chunk(&h, &db, id, b);
        }
        set_record(&db, r0.0, &r0.1);
    }
    // Put back as the owner sealed it, it recovers.
    let into = c.path("restored");
    recover(&c, &h, &key, &into).ok();
    assert_eq!(tree(&into), tree(&docs));
}

#[test]
fn trusted_devices_share_the_key_and_a_paired_device_accepts_to_hold_the_folder() {
    let lab = Lab::new();
    let a = lab.node("a");
    let b = lab.node("b");
    let h = lab.node("h");
    let docs = a.add_folder("docs");
    fs::write(docs.join("notes.txt"), b"DELTA-MARKER-4410").unwrap();
    let (_aa, _ab, _ah) = (Agent::start(&a), Agent::start(&b), Agent::start(&h));
    let b_docs = b.path("docs");
    pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", b_docs.to_str().unwrap()],
    );
    // Both trusted devices seal the folder alike: either one's recovery code
    // opens what a holder keeps.
    assert_eq!(key_of(&a, "docs"), key_of(&b, "docs"));

    // A device paired without a folder is asked to hold it, and accepts.
    pair(&a, &h, &[], &[]);
    a.run(&["share", "docs", &h.id(), "--encrypted"]).ok();
    let offer = agent::wait_for("the offer to reach the holder", || {
        h.offers().into_iter().find(|o| o["encrypted"] == true)
    });
    assert_eq!(offer["folder_id"], "docs");
    let id = offer["id"].to_string();
    // Held encrypted, there is no place for files: --into is refused.
    let run = h.run(&["folder", "accept", &id, "--into", "/tmp/x"]);
    assert_ne!(run.code, 0, "{run}");
    h.run(&["folder", "accept", &id]).ok();
    wait_until("the holder has the folder", || held(&a, &h));
    assert!(h.folders().is_empty());
    let text = h.run(&["status"]).ok().stdout;
    assert!(text.contains("Holding folder docs"), "{text}");

    // B edits the file; A keeps the version it replaced in its history, and
    // the holder gets that version too.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    fs::write(b_docs.join("notes.txt"), b"ECHO-MARKER-9921").unwrap();
    wait_until("A has B's edit", || {
        fs::read(docs.join("notes.txt")).is_ok_and(|c| c == b"ECHO-MARKER-9921")
    });
    wait_until("the holder has the old version too", || {
        held(&a, &h) && status(&h)["vaults"][0]["records"].as_u64() >= Some(2)
    });

    // A fresh device recovers the folder as it is, and as it was before.
    let c = lab.node("c");
    let _ac = Agent::start(&c);
    pair(&h, &c, &[], &[]);
    let key = key_of(&b, "docs");
    let now = c.path("now");
    recover(&c, &h, &key, &now).ok();
    assert_eq!(
        fs::read(now.join("notes.txt")).unwrap(),
        b"ECHO-MARKER-9921"
    );
    // Once more onto the same device: it has the folder already.
    let again = recover(&c, &h, &key, &c.path("again"));
    assert!(again.stderr.contains("already has folder docs"), "{again}");
    assert!(!c.path("again").join("notes.txt").exists());
    let d = lab.node("d");
    let _ad = Agent::start(&d);
    pair(&h, &d, &[], &[]);
    let then = d.path("then");
    let at = format!("@{before}");
    d.run(&[
        "recover",
        "--from",
        &h.id(),
        "--key",
        &key,
        "--into",
        then.to_str().unwrap(),
        "--at",
        &at,
    ])
    .ok();
    assert_eq!(
        fs::read(then.join("notes.txt")).unwrap(),
        b"DELTA-MARKER-4410"
    );
}

#[test]
fn versions_pruned_on_the_owner_are_dropped_from_the_holder_with_their_chunks() {
    let lab = Lab::new();
    let a = lab.node("a");
    let h = lab.node("h");
    let docs = a.add_folder("docs");
    // Versions replaced by local edits are kept too, so one edit makes one.
    a.run(&["config", "set", "history.local", "true"]).ok();
    let old = pseudo_random(2_000_000, 31);
    fs::write(docs.join("report.bin"), &old).unwrap();
    let (_aa, _ah) = (Agent::start(&a), Agent::start(&h));
    pair(&a, &h, &["--folder", "docs", "--encrypted"], &[]);
    wait_until("the holder has the folder", || held(&a, &h));
    // Only a captured version is kept when an edit replaces it: wait for A's
    // history pass to have stored the file's bytes.
    wait_until("A has captured report.bin", || {
        let stats = a.run(&["history", "stats", "--json"]).ok().json();
        stats["store"]["chunk_bytes"].as_u64() >= Some(2_000_000)
    });

    // An edit: the holder gets the new file and the version it replaced.
    let new = pseudo_random(2_000_000, 32);
    fs::write(docs.join("report.bin"), &new).unwrap();
    wait_until("the holder has the old version too", || {
        held(&a, &h) && status(&h)["vaults"][0]["records"].as_u64() >= Some(2)
    });
    let before = status(&h)["vaults"][0].clone();
    assert!(
        before["bytes"].as_u64().unwrap() >= 4_000_000,
        "both versions' chunks are held: {before}"
    );

    // A's history drops the old version (a 1 MB cap; nothing under an hour
    // old is ever pruned, so the version is made two hours old in A's index);
    // the holder follows at its next round (the next change here, or the
    // hourly backstop).
    let db = rusqlite::Connection::open(a.home.join("index.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    let aged = db
        .execute(
            "UPDATE history SET superseded_at = superseded_at - 7200",
            [],
        )
        .unwrap();
    assert_eq!(aged, 1, "one version kept");
    drop(db);
    a.run(&["config", "set", "history.max_size_mb", "1"]).ok();
    let pruned = a.run(&["history", "prune", "--json"]).ok().json();
    assert!(pruned["versions"].as_u64() >= Some(1), "{pruned}");
    fs::write(docs.join("wake.txt"), b"a change").unwrap();
    let after = agent::wait_for("the holder to drop the pruned version", || {
        let v = status(&h)["vaults"][0].clone();
        let records = v["records"].as_u64()?;
        let bytes = v["bytes"].as_u64()?;
        // The current report.bin and wake.txt; the old version gone, and
        // with it the chunks nothing else refers to.
        (held(&a, &h) && records == 2 && bytes < 3_000_000).then_some(v)
    });
    assert!(
        after["chunks"].as_u64() < before["chunks"].as_u64(),
        "{before} -> {after}"
    );

    // What is left still recovers the folder as it is.
    let c = lab.node("c");
    let _ac = Agent::start(&c);
    pair(&h, &c, &[], &[]);
    let into = c.path("restored");
    recover(&c, &h, &key_of(&a, "docs"), &into).ok();
    assert_eq!(fs::read(into.join("report.bin")).unwrap(), new);
    assert_eq!(tree(&into), tree(&docs));
}
