//! Using ferry from a shell and from scripts: `ferry config`, exit codes,
//! the documented `--json` shapes, log output, `ferry status --watch` and
//! `ferry doctor`, each against the real binary and real agents.

#[path = "common/agent.rs"]
mod harness;

use harness::{Agent, Lab, ferry, wait_until};
use serde_json::Value;
use std::fs;

/// The folder entry `id` of `ferry status --json`.
fn folder_status(node: &harness::Node, id: &str) -> Value {
    let st = node.run(&["status", "--json"]).ok().json();
    st["folders"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["id"] == id).cloned())
        .unwrap_or_else(|| panic!("no folder {id} in {st}"))
}

#[test]
fn config_set_is_checked_kept_in_the_file_and_applied_live_where_it_can_be() {
    let lab = Lab::new();
    let a = lab.node("a");
    let docs = a.add_folder("docs");
    for i in 0..20 {
        fs::write(docs.join(format!("f{i}.txt")), format!("file {i}")).unwrap();
    }
    let agent = Agent::start(&a);
    wait_until("the agent has scanned the 20 files", || {
        folder_status(&a, "docs")["files"] == 20
    });

    // Refused changes say what is allowed and leave the file as it was.
    let path = a.run(&["config", "path"]).ok().stdout.trim().to_owned();
    assert_eq!(path, a.home.join("config.toml").to_str().unwrap());
    let before = fs::read(&path).unwrap();
    let r = a.run(&["config", "set", "scan.hold_deletes_percent", "101"]);
    let r = r.exits(1);
    assert!(r.stderr.contains("0 to 100"), "{r}");
    let r = a.run(&["config", "set", "scan.debounce_ms", "50"]).exits(1);
    assert!(r.stderr.contains("did you mean sync.debounce_ms?"), "{r}");
    let r = a
        .run(&["config", "set", "history.retention", "weekly"])
        .exits(1);
    assert!(
        r.stderr.contains("staggered") && r.stderr.contains("keep-all"),
        "{r}"
    );
    let r = a
        .run(&["config", "set", "network.discovery", "yes"])
        .exits(1);
    assert!(r.stderr.contains("true or false"), "{r}");
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "a refused set changed the file"
    );

    // Deleting every file is held back by default (more than 50% at once);
    // turned off live, the agent records the deletes without a restart.
    assert_eq!(
        a.run(&["config", "get", "scan.hold_deletes_percent"])
            .ok()
            .stdout
            .trim(),
        "50"
    );
    let r = a
        .run(&["config", "set", "scan.hold_deletes_percent", "100"])
        .ok();
    assert!(r.stdout.contains("(was 50)"), "{r}");
    assert!(r.stdout.contains("The running agent applied it"), "{r}");
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("\nhold_deletes_percent = 100\n"), "{text}");
    assert!(
        text.contains("# ... but only when that is at least this many entries."),
        "the comments went: {text}"
    );
    for i in 0..20 {
        fs::remove_file(docs.join(format!("f{i}.txt"))).unwrap();
    }
    wait_until("the agent records the 20 deletes", || {
        folder_status(&a, "docs")["deleted"] == 20
    });
    assert_eq!(folder_status(&a, "docs")["held_deletes"], 0);

    // A network setting is saved, and said to wait for a restart, in the
    // answer and in the agent's status.
    let r = a.run(&["config", "set", "network.relays", "disabled"]).ok();
    assert!(
        r.stdout.contains("takes effect when the agent restarts"),
        "{r}"
    );
    let st = a.run(&["status", "--json"]).ok().json();
    assert_eq!(
        st["agent"]["config_restart_needed"],
        serde_json::json!(["network.relays"])
    );
    assert_eq!(
        a.run(&["config", "get", "network.relays"])
            .ok()
            .stdout
            .trim(),
        "disabled"
    );
    let list = a.run(&["config", "list", "--json"]).ok().json();
    assert_eq!(list["network.relays"], "disabled");
    assert_eq!(list["scan.hold_deletes_percent"], 100);
    assert_eq!(list["sync.debounce_ms"], 200);
    agent.stop();

    // Without an agent the change is saved and read at the next start.
    let r = a.run(&["config", "set", "sync.debounce_ms", "300"]).ok();
    assert!(r.stdout.contains("agent is not running"), "{r}");
    let agent = Agent::start(&a);
    let st = a.run(&["status", "--json"]).ok().json();
    assert_eq!(st["agent"]["config_restart_needed"], serde_json::json!([]));
    assert_eq!(st["agent"]["operations"], serde_json::json!([]));
    drop(agent);
}

#[test]
fn exit_codes_tell_usage_errors_and_a_missing_agent_apart() {
    let lab = Lab::new();
    let a = lab.node("a");
    a.add_folder("docs");
    // No agent: every command that needs it exits with 3.
    for args in [
        &["devices"][..],
        &["invite"],
        &["status", "--need", "docs"],
        &["revert", "docs"],
        &["share", "docs", "someone"],
        &["device", "remove", "someone"],
    ] {
        let r = a.run(args).exits(3);
        assert!(r.stderr.contains("agent is not running"), "{args:?}: {r}");
    }
    // Usage errors exit with 2.
    for args in [
        &["frobnicate"][..],
        &["status", "--bogus"],
        &["config", "set", "sync.debounce_ms"],
        &["status", "--watch", "--interval", "soon"],
    ] {
        a.run(args).exits(2);
    }
    // An ordinary error exits with 1.
    a.run(&["ls", "nope"]).exits(1);
    ferry(&a.dir.join("no-home-here"), &["status"]).exits(1);
}

#[test]
fn json_outputs_have_the_documented_fields() {
    let lab = Lab::new();
    let a = lab.node("a");
    let docs = a.add_folder("docs");
    fs::write(docs.join("x.txt"), "x").unwrap();
    let has = |v: &Value, fields: &[&str]| {
        for f in fields {
            assert!(v.get(*f).is_some(), "no {f:?} in {v}");
        }
    };
    let scan = a.run(&["scan", "--json"]).ok().json();
    has(&scan[0], &["folder", "ok", "seconds", "report"]);
    has(
        &scan[0]["report"],
        &[
            "entries",
            "new",
            "changed",
            "deleted",
            "hashed_files",
            "hashed_bytes",
        ],
    );
    let list = a.run(&["folder", "list", "--json"]).ok().json();
    has(&list[0], &["id", "label", "path", "type"]);
    let ls = a.run(&["ls", "docs", "--json"]).ok().json();
    assert!(ls.is_array(), "{ls}");
    let conflicts = a.run(&["conflicts", "--json"]).ok().json();
    assert!(conflicts.is_array(), "{conflicts}");
    let config = a.run(&["config", "list", "--json"]).ok().json();
    has(
        &config,
        &["device.name", "sync.debounce_ms", "network.listen"],
    );
    let status = a.run(&["status", "--json"]).ok().json();
    has(
        &status,
        &["device", "agent", "offers", "peers", "vaults", "folders"],
    );
    assert!(status["agent"].is_null(), "{status}");
    has(
        &status["folders"][0],
        &[
            "id",
            "label",
            "path",
            "type",
            "state",
            "error",
            "files",
            "dirs",
            "bytes",
            "need_items",
            "need_bytes",
            "completion",
            "peers",
            "holders",
        ],
    );

    let _agent = Agent::start(&a);
    let devices = a.run(&["devices", "--json"]).ok().json();
    assert_eq!(devices, serde_json::json!([]));
    let status = a.run(&["status", "--json"]).ok().json();
    has(
        &status["agent"],
        &[
            "pid",
            "device_id",
            "name",
            "addresses",
            "refused_links",
            "folders",
        ],
    );
    let need = a.run(&["status", "--need", "docs", "--json"]).ok().json();
    has(&need, &["state", "need_items", "need_bytes", "need"]);
    let doctor = a.run(&["doctor", "--json"]).json();
    has(&doctor, &["ok", "checks"]);
    has(&doctor["checks"][0], &["check", "ok", "detail", "advice"]);
}

/// The checks of `ferry doctor --json` that failed, by name.
fn failed_checks(node: &harness::Node) -> Vec<(String, String)> {
    let r = node.run(&["doctor", "--json"]);
    let v = r.json();
    assert_eq!(v["ok"], r.code == 0, "exit code and ok disagree: {r}");
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| {
            let advice = c["advice"].as_str().unwrap_or_default();
            assert!(!advice.is_empty(), "a failed check without advice: {c}");
            (
                c["check"].as_str().unwrap().to_owned(),
                format!("{}; {advice}", c["detail"].as_str().unwrap()),
            )
        })
        .collect()
}

#[test]
fn doctor_says_ok_for_a_healthy_pair_and_what_to_do_about_each_problem() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::new();
    let (a, b, agent_a, agent_b, a_docs, _b_docs) = harness::two(&lab);
    let r = a.run(&["doctor"]).ok();
    assert!(r.stdout.contains("ok    device b: connected"), "{r}");
    assert!(r.stdout.contains("All is well."), "{r}");
    let v = a.run(&["doctor", "--json"]).ok().json();
    assert_eq!(v["ok"], true);
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    for want in [
        "home",
        "device key",
        "config",
        "database",
        "agent",
        "folder docs",
        "device b",
    ] {
        assert!(names.contains(&want), "no {want:?} check in {names:?}");
    }
    b.run(&["doctor"]).ok();

    // A folder's marker removed.
    fs::remove_dir_all(a_docs.join(".ferry")).unwrap();
    let failed = failed_checks(&a);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "folder docs");
    assert!(
        failed[0].1.contains("no .ferry marker") && failed[0].1.contains("ferry folder add"),
        "{failed:?}"
    );
    let r = a.run(&["doctor"]).exits(1);
    assert!(r.stdout.contains("FAIL  folder docs:"), "{r}");
    assert!(r.stdout.contains("1 problem found."), "{r}");
    fs::create_dir(a_docs.join(".ferry")).unwrap();

    // The home writable by everyone.
    fs::set_permissions(&a.home, fs::Permissions::from_mode(0o777)).unwrap();
    let failed = failed_checks(&a);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "home");
    assert!(failed[0].1.contains("chmod 700"), "{failed:?}");
    fs::set_permissions(&a.home, fs::Permissions::from_mode(0o700)).unwrap();

    // B's agent stopped: B's doctor says to start it, A's that B is gone.
    agent_b.stop();
    let failed = failed_checks(&b);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "agent");
    assert!(failed[0].1.contains("ferry daemon"), "{failed:?}");
    wait_until("A sees B offline", || !a.connected_to(&b.id()));
    let failed = failed_checks(&a);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "device b");
    assert!(
        failed[0].1.contains("not connected") && failed[0].1.contains("its agent runs"),
        "{failed:?}"
    );
    drop(agent_a);
}

#[test]
fn agent_logs_to_a_pipe_or_file_are_plain_lines_without_escapes_or_timestamps() {
    use std::process::{Command, Stdio};
    let lab = Lab::new();
    let a = lab.node("a");
    let docs = a.add_folder("docs");
    let log = a.dir.join("plain.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--home")
        .arg(&a.home)
        .args([
            "--log-level",
            "debug",
            "daemon",
            "--offline",
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("FERRY_HOME")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("FERRY_LOG_TIMESTAMPS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until("the agent answers", || a.run(&["devices"]).code == 0);
    fs::write(docs.join("new.txt"), "new").unwrap();
    wait_until("the agent logs the local change", || {
        fs::read_to_string(&log).unwrap().contains("local changes")
    });
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    child.wait().unwrap();
    let bytes = fs::read(&log).unwrap();
    assert!(!bytes.contains(&0x1b), "escape bytes in the log");
    let text = String::from_utf8(bytes).unwrap();
    let line = text.lines().find(|l| l.contains("local changes")).unwrap();
    assert!(
        line.trim_start().starts_with("INFO "),
        "a log line should start with its level: {line:?}"
    );
    assert!(
        text.contains("DEBUG "),
        "--log-level debug not honoured:\n{text}"
    );
}

#[test]
fn status_watch_prints_a_block_per_interval_and_ends_when_stdout_closes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let lab = Lab::new();
    let a = lab.node("a");
    a.add_folder("docs");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--home")
        .arg(&a.home)
        .args(["status", "--watch", "--interval", "1"])
        .env_remove("FERRY_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut headers = 0;
    let mut folder_rows = 0;
    while headers < 3 {
        let line = lines.next().expect("watch output ended").unwrap();
        assert!(
            !line.contains('\x1b'),
            "escape codes off a terminal: {line:?}"
        );
        if line.starts_with("--- ") && line.ends_with(" UTC ---") {
            headers += 1;
        }
        if line.starts_with("docs ") {
            folder_rows += 1;
        }
    }
    assert!(folder_rows >= 2, "each block lists the folder");
    drop(lines);
    // Its next write finds the pipe closed: it ends (killed by SIGPIPE).
    wait_until("status --watch ends once its stdout is closed", || {
        child.try_wait().unwrap().is_some()
    });
}
