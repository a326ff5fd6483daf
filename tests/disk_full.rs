//! A sync into a full disk: where this machine lets the test mount a small
//! tmpfs (as root), the receiving folder lives on one. The pull fails with a
//! clear reason, the files already there stay intact, and the sync completes
//! once there is room. Skipped, saying so, where mounting is not allowed.

#[path = "common/agent.rs"]
mod agent;

use std::fs;
use std::path::Path;
use std::process::Command;

use agent::{Agent, Lab, pair, pseudo_random, tree, wait_for, wait_until};

/// Mounts a tmpfs of `size` (e.g. "4m") on `dir`; false if not allowed.
fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    fs::create_dir_all(dir).unwrap();
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Unmounts `dir` when dropped, so a failing test leaves no mount behind.
struct Mounted<'a>(&'a Path);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).output();
    }
}

#[test]
fn a_full_disk_fails_clearly_keeps_what_is_there_and_finishes_once_there_is_room() {
    let lab = Lab::new();
    let a = lab.node("a");
    let b = lab.node("b");
    let a_docs = a.add_folder("docs");
    let b_docs = b.path("docs");
    if !mount_tmpfs(&b_docs, "4m") {
        eprintln!("skipped: this machine does not let the test mount a tmpfs (not root?)");
        return;
    }
    let _mounted = Mounted(&b_docs);
    let keep = pseudo_random(1_000_000, 1);
    fs::write(a_docs.join("keep.bin"), &keep).unwrap();
    let (_aa, _ab) = (Agent::start(&a), Agent::start(&b));
    pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", b_docs.to_str().unwrap()],
    );
    wait_until("B has keep.bin", || {
        fs::read(b_docs.join("keep.bin")).is_ok_and(|c| c == keep)
    });

    // A file larger than the room left on B's disk.
    let big = pseudo_random(6_000_000, 2);
    fs::write(a_docs.join("big.bin"), &big).unwrap();
    let reason = wait_for("B to say why big.bin is not in sync", || {
        let need = b.run(&["status", "--need", "docs", "--json"]).ok().json();
        let item = need["need"]
            .as_array()?
            .iter()
            .find(|i| i["path"] == "big.bin")?
            .clone();
        let reason = item["reason"].as_str()?.to_owned();
        reason.contains("space").then_some(reason)
    });
    assert!(reason.to_lowercase().contains("no space"), "{reason}");
    // Nothing already there was harmed, and nothing half-written is in place.
    assert_eq!(fs::read(b_docs.join("keep.bin")).unwrap(), keep);
    assert!(!b_docs.join("big.bin").exists());

    // Room again: the pull finishes and the trees agree.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=32m"])
        .arg(&b_docs)
        .output()
        .unwrap();
    assert!(grown.status.success(), "{grown:?}");
    wait_until("B has big.bin", || {
        fs::read(b_docs.join("big.bin")).is_ok_and(|c| c == big)
    });
    wait_until("both trees agree", || tree(&a_docs) == tree(&b_docs));
}
