//! End-to-end scenarios that drive the real `ferry` binary against real homes,
//! folders and SQLite files.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    fn fails_with(self, needle: &str) -> Self {
        assert_eq!(
            self.code, 1,
            "expected exit 1\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {}",
            self.stderr
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

fn ferry(home: &Path, args: &[&str]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("FERRY_HOME")
        .env_remove("RUST_LOG")
        .output()
        .expect("run ferry");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    data: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let data = tmp.path().join("data");
    fs::create_dir_all(&data).unwrap();
    ferry(&home, &["init", "--name", "laptop"]).ok();
    Fixture {
        _tmp: tmp,
        home,
        data,
    }
}

fn folder_count(home: &Path) -> usize {
    ferry(home, &["folder", "list", "--json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn init_creates_a_home_once_and_id_prints_the_device_key() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("h");
    let first = ferry(&home, &["init", "--name", "laptop"]).ok();
    assert!(first.stdout.contains("Initialised"), "{}", first.stdout);
    let id = ferry(&home, &["id"]).ok().stdout.trim().to_owned();
    assert_eq!(id.len(), 64);
    assert!(first.stdout.contains(&id));

    let files_before: Vec<_> = ["device.key", "config.toml"]
        .iter()
        .map(|f| fs::read(home.join(f)).unwrap())
        .collect();
    let again = ferry(&home, &["init", "--name", "other"]).ok();
    assert!(
        again.stdout.contains("nothing was changed"),
        "{}",
        again.stdout
    );
    let files_after: Vec<_> = ["device.key", "config.toml"]
        .iter()
        .map(|f| fs::read(home.join(f)).unwrap())
        .collect();
    assert_eq!(files_before, files_after);
    assert_eq!(ferry(&home, &["id"]).ok().stdout.trim(), id);

    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(home.join("device.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let config = fs::read_to_string(home.join("config.toml")).unwrap();
    assert!(config.contains("# The name other devices see"), "{config}");
    assert!(config.contains("name = \"laptop\""), "{config}");

    // A second home on the same machine is a different device.
    let other = tmp.path().join("h2");
    ferry(&other, &["init"]).ok();
    assert_ne!(ferry(&other, &["id"]).ok().stdout.trim(), id);
}

#[test]
fn commands_on_an_uninitialised_home_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("nothing-here");
    for args in [&["id"][..], &["status"], &["folder", "list"], &["scan"]] {
        ferry(&home, args).fails_with("no ferry home");
    }
    assert!(!home.exists(), "a failed command created the home");
}

#[test]
fn bad_folders_are_refused_and_change_nothing() {
    let fx = fixture();
    let inner = fx.data.join("inner");
    fs::create_dir_all(&inner).unwrap();
    fs::write(fx.data.join("file.txt"), b"x").unwrap();
    let home = &fx.home;
    let data = fx.data.to_str().unwrap();

    ferry(home, &["folder", "add", data, "--id", "docs"]).ok();
    assert!(fx.data.join(".ferry").is_dir());

    ferry(home, &["folder", "add", "/definitely/not/here"]).fails_with("does not exist");
    ferry(
        home,
        &["folder", "add", fx.data.join("file.txt").to_str().unwrap()],
    )
    .fails_with("is not a directory");
    ferry(home, &["folder", "add", inner.to_str().unwrap()]).fails_with("is inside folder docs");
    ferry(
        home,
        &["folder", "add", fx.data.parent().unwrap().to_str().unwrap()],
    )
    .fails_with("contains folder docs");
    ferry(home, &["folder", "add", data]).fails_with("already added as folder docs");
    let elsewhere = fx.data.parent().unwrap().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    ferry(
        home,
        &["folder", "add", elsewhere.to_str().unwrap(), "--id", "docs"],
    )
    .fails_with("already exists");
    ferry(
        home,
        &["folder", "add", elsewhere.to_str().unwrap(), "--id", "../x"],
    )
    .fails_with("invalid folder id");
    let usage = ferry(home, &["folder", "add", data, "--type", "sideways"]);
    assert_eq!(usage.code, 2, "{}", usage.stderr);

    assert_eq!(folder_count(home), 1);
    assert!(!inner.join(".ferry").exists());
    assert!(!elsewhere.join(".ferry").exists());
}

#[test]
fn scan_status_and_ls_show_what_the_index_holds() {
    let fx = fixture();
    fs::create_dir_all(fx.data.join("docs/deep")).unwrap();
    fs::write(fx.data.join("docs/deep/a.txt"), b"alpha").unwrap();
    fs::write(fx.data.join("b.bin"), vec![7u8; 300_000]).unwrap();
    std::os::unix::fs::symlink("b.bin", fx.data.join("link")).unwrap();
    fs::write(fx.data.join(".ferryignore"), "*.tmp\n").unwrap();
    fs::write(fx.data.join("scratch.tmp"), b"ignored").unwrap();
    let home = &fx.home;
    ferry(
        home,
        &[
            "folder",
            "add",
            fx.data.to_str().unwrap(),
            "--id",
            "main",
            "--label",
            "Main",
        ],
    )
    .ok();

    let scan = ferry(home, &["scan"]).ok();
    assert!(scan.stdout.contains("main:"), "{}", scan.stdout);

    let status = ferry(home, &["status", "--json"]).ok().json();
    let f = &status["folders"][0];
    assert_eq!(f["id"], "main");
    assert_eq!(f["state"], "idle");
    assert_eq!(f["files"], 3); // a.txt, b.bin, .ferryignore
    assert_eq!(f["dirs"], 2);
    assert_eq!(f["symlinks"], 1);
    assert_eq!(f["bytes"], 5 + 300_000 + 6);
    assert_eq!(status["device"]["name"], "laptop");
    let human = ferry(home, &["status"]).ok().stdout;
    assert!(human.contains("main") && human.contains("idle"), "{human}");

    let ls = ferry(home, &["ls", "main", "--json"]).ok().json();
    let paths: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            ".ferryignore",
            "b.bin",
            "docs",
            "docs/deep",
            "docs/deep/a.txt",
            "link"
        ]
    );
    let b = &ls[1];
    assert_eq!(
        b["hash"],
        blake3::hash(&vec![7u8; 300_000]).to_hex().as_str()
    );
    assert!(b["chunks"].as_u64().unwrap() >= 2);
    assert_eq!(b["version"].as_object().unwrap().len(), 1);
    assert_eq!(ls[5]["symlink_target"], "b.bin");

    let sub = ferry(home, &["ls", "main", "docs", "--json"]).ok().json();
    assert_eq!(sub.as_array().unwrap().len(), 3);
    ferry(home, &["ls", "main", "../etc"]).fails_with("climbs out");
    ferry(home, &["ls", "nope"]).fails_with("no folder with id nope");
}

#[test]
fn a_missing_root_is_an_error_state_and_deletes_nothing() {
    let fx = fixture();
    fs::write(fx.data.join("keep.txt"), b"precious").unwrap();
    let home = &fx.home;
    ferry(
        home,
        &["folder", "add", fx.data.to_str().unwrap(), "--id", "usb"],
    )
    .ok();
    ferry(home, &["scan"]).ok();

    let unmounted = fx.data.with_file_name("moved-away");
    fs::rename(&fx.data, &unmounted).unwrap();
    ferry(home, &["scan", "usb"]).fails_with("is missing");
    let status = ferry(home, &["status", "--json"]).ok().json();
    assert_eq!(status["folders"][0]["state"], "error");
    assert!(
        status["folders"][0]["error"]
            .as_str()
            .unwrap()
            .contains("missing")
    );
    let ls = ferry(home, &["ls", "usb", "--deleted", "--json"])
        .ok()
        .json();
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["deleted"], false);

    // An empty directory where the disk used to be mounted: no marker.
    fs::create_dir_all(&fx.data).unwrap();
    ferry(home, &["scan", "usb"]).fails_with("marker");
    let ls = ferry(home, &["ls", "usb", "--json"]).ok().json();
    assert_eq!(ls[0]["deleted"], false);

    // The disk comes back: scanning works again.
    fs::remove_dir(&fx.data).unwrap();
    fs::rename(&unmounted, &fx.data).unwrap();
    ferry(home, &["scan", "usb"]).ok();
    let status = ferry(home, &["status", "--json"]).ok().json();
    assert_eq!(status["folders"][0]["state"], "idle");
    assert_eq!(status["folders"][0]["files"], 1);
}

#[test]
fn removing_a_folder_forgets_it_but_keeps_its_files() {
    let fx = fixture();
    fs::write(fx.data.join("a.txt"), b"keep me").unwrap();
    let home = &fx.home;
    ferry(
        home,
        &["folder", "add", fx.data.to_str().unwrap(), "--id", "f1"],
    )
    .ok();
    ferry(home, &["scan"]).ok();
    let out = ferry(home, &["folder", "remove", "f1"]).ok();
    assert!(out.stdout.contains("not touched"), "{}", out.stdout);
    assert_eq!(fs::read(fx.data.join("a.txt")).unwrap(), b"keep me");
    assert_eq!(folder_count(home), 0);
    ferry(home, &["folder", "remove", "f1"]).fails_with("no folder with id f1");
    // It can be added again.
    ferry(
        home,
        &["folder", "add", fx.data.to_str().unwrap(), "--id", "f1"],
    )
    .ok();
}

/// The folder's vault secret as the index holds it.
fn stored_secret(home: &Path, id: &str) -> ferry::vault::FolderSecret {
    let mut index = ferry::home::Home::open(home).unwrap().index().unwrap();
    let folder = index
        .folder(&ferry::folder::FolderId::new(id).unwrap())
        .unwrap()
        .unwrap();
    index.folder_secret(folder.row).unwrap()
}

#[test]
fn folder_key_prints_the_stored_secret_as_a_recovery_code() {
    let fx = fixture();
    let home = &fx.home;
    ferry(
        home,
        &["folder", "add", fx.data.to_str().unwrap(), "--id", "docs"],
    )
    .ok();
    let out = ferry(home, &["folder", "key", "docs"]).ok();
    let code = out.stdout.trim();
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    assert!(code.starts_with("ferrykey1-"), "{code}");
    assert!(out.stderr.contains("Keep it offline"), "{}", out.stderr);
    assert!(out.stderr.contains("anyone"), "{}", out.stderr);
    assert!(!out.stderr.contains(code), "the warning repeats the code");
    let stored = stored_secret(home, "docs");
    assert_eq!(
        ferry::vault::FolderSecret::from_recovery_code(code),
        Ok(stored)
    );
    // The same secret every time, and in the JSON form too.
    let again = ferry(home, &["folder", "key", "docs", "--json"]).ok();
    assert_eq!(again.json()["folder"], "docs");
    assert_eq!(again.json()["recovery_code"], code);
    assert!(again.stderr.contains("Keep it offline"), "{}", again.stderr);

    // Another folder has another secret.
    let other = fx.data.parent().unwrap().join("other");
    fs::create_dir_all(&other).unwrap();
    ferry(
        home,
        &["folder", "add", other.to_str().unwrap(), "--id", "pics"],
    )
    .ok();
    let pics = ferry(home, &["folder", "key", "pics"]).ok();
    assert_ne!(pics.stdout.trim(), code);
}

#[test]
fn folder_key_of_an_unknown_folder_fails() {
    let fx = fixture();
    let out = ferry(&fx.home, &["folder", "key", "nope"]).fails_with("no folder with id nope");
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    ferry(&fx.home, &["folder", "key", ".bad"]).fails_with(".bad");
}

#[test]
fn the_folder_secret_stays_out_of_listings_and_logs() {
    let fx = fixture();
    let home = &fx.home;
    fs::write(fx.data.join("a.txt"), b"hello").unwrap();
    ferry(
        home,
        &["folder", "add", fx.data.to_str().unwrap(), "--id", "docs"],
    )
    .ok();
    let secret = stored_secret(home, "docs");
    let code = secret.recovery_code().to_string();
    let hex = blake3::Hash::from_bytes(*secret.as_bytes())
        .to_hex()
        .to_string();
    let groups: Vec<&str> = code.split('-').skip(1).collect();
    let leaks = |text: &str| {
        text.contains(&hex)
            || text.contains(&hex.to_uppercase())
            || groups.windows(2).any(|w| text.contains(&w.join("-")))
    };
    for args in [
        &["--log-level", "trace", "folder", "list", "--json"][..],
        &["--log-level", "trace", "folder", "list"],
        &["--log-level", "trace", "scan", "--json"],
        &["--log-level", "trace", "status", "--json"],
        &["--log-level", "trace", "ls", "docs", "--json"],
    ] {
        let out = ferry(home, args).ok();
        assert!(!leaks(&out.stdout), "{args:?} printed the secret");
        assert!(!leaks(&out.stderr), "{args:?} logged the secret");
    }
    let key = ferry(home, &["--log-level", "trace", "folder", "key", "docs"]).ok();
    assert!(leaks(&key.stdout));
    assert!(!leaks(&key.stderr), "folder key logged the secret");
}

#[test]
fn a_locked_database_is_reported_and_nothing_changes() {
    let fx = fixture();
    let home = &fx.home;
    let config = home.join("config.toml");
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("busy_timeout_ms = 5000", "busy_timeout_ms = 200");
    fs::write(&config, text).unwrap();

    let conn = rusqlite::Connection::open(home.join("index.db")).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    ferry(home, &["folder", "add", fx.data.to_str().unwrap()]).fails_with("locked");
    conn.execute_batch("ROLLBACK").unwrap();
    drop(conn);

    assert_eq!(folder_count(home), 0);
    assert!(!fx.data.join(".ferry").exists(), "marker left behind");
}

#[test]
fn a_database_that_is_not_ferrys_is_refused_untouched() {
    let fx = fixture();
    let db = fx.home.join("index.db");
    for f in ["index.db-wal", "index.db-shm"] {
        let _ = fs::remove_file(fx.home.join(f));
    }
    let junk = b"this is not an SQLite database, it is a shopping list".repeat(100);
    fs::write(&db, &junk).unwrap();
    ferry(&fx.home, &["status"]).fails_with("not a ferry database");
    assert_eq!(fs::read(&db).unwrap(), junk);

    fs::remove_file(&db).unwrap();
    let other = rusqlite::Connection::open(&db).unwrap();
    other
        .execute_batch("CREATE TABLE recipes (name TEXT); INSERT INTO recipes VALUES ('soup');")
        .unwrap();
    drop(other);
    ferry(&fx.home, &["folder", "list"]).fails_with("not a ferry database");
    let other = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = other
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1, "ferry added tables to a foreign database");
}
