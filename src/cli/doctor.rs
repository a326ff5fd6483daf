//! `ferry doctor`: checks the home, the index, every folder, the agent and the
//! links to paired devices, and says for each problem what to do.
//!
//! It opens nothing through [`Home::open`](crate::home::Home::open), which
//! refuses a home with a loose key: that is one of the things it reports.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::output;
use crate::config::Config;
use crate::daemon::control::{self, Request};
use crate::folder::{FolderError, check_root};
use crate::home::{CONFIG_FILE, DB_FILE, KEY_FILE};
use crate::index::Index;

/// One check's outcome.
#[derive(Debug, Serialize)]
struct Check {
    /// What was checked, e.g. `home`, `folder docs`, `device laptop`.
    check: String,
    /// Whether it is fine.
    ok: bool,
    /// What was found.
    detail: String,
    /// What to do about it (only when not ok).
    advice: Option<String>,
}

fn ok(check: impl Into<String>, detail: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        ok: true,
        detail: detail.into(),
        advice: None,
    }
}

fn fail(check: impl Into<String>, detail: impl Into<String>, advice: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        ok: false,
        detail: detail.into(),
        advice: Some(advice.into()),
    }
}

fn mode_of(path: &Path) -> Option<u32> {
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

pub(super) fn run(root: &Path, json: bool) -> anyhow::Result<i32> {
    let checks = checks(root);
    let all_ok = checks.iter().all(|c| c.ok);
    if json {
        let v = serde_json::json!({ "ok": all_ok, "checks": checks });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for c in &checks {
            match &c.advice {
                None => println!("ok    {}: {}", c.check, c.detail),
                Some(a) => println!("FAIL  {}: {}; {a}", c.check, c.detail),
            }
        }
        let bad = checks.iter().filter(|c| !c.ok).count();
        if bad == 0 {
            println!("All is well.");
        } else {
            println!("{bad} problem{} found.", if bad == 1 { "" } else { "s" });
        }
    }
    Ok(if all_ok {
        super::EXIT_OK
    } else {
        super::EXIT_ERROR
    })
}

fn checks(root: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    let shown = root.display();
    // The home directory.
    match mode_of(root) {
        None => {
            out.push(fail(
                "home",
                format!("no ferry home at {shown}"),
                "run `ferry init`, or pass --home / set FERRY_HOME to where it is",
            ));
            return out;
        }
        Some(m) if m & 0o022 != 0 => out.push(fail(
            "home",
            format!("{shown} is writable by other users (mode {m:o})"),
            format!("run `chmod 700 {shown}`"),
        )),
        Some(m) => out.push(ok("home", format!("{shown} (mode {m:o})"))),
    }
    // The device key.
    let key = root.join(KEY_FILE);
    match mode_of(&key) {
        None => out.push(fail(
            "device key",
            format!("{} is missing", key.display()),
            "run `ferry init` to make a new device (its id changes: pair it again)",
        )),
        Some(m) if m & 0o077 != 0 => out.push(fail(
            "device key",
            format!("{} is readable by other users (mode {m:o})", key.display()),
            format!("run `chmod 600 {}`", key.display()),
        )),
        Some(m) => out.push(ok("device key", format!("mode {m:o}"))),
    }
    // The config.
    let config_path = root.join(CONFIG_FILE);
    let config = match std::fs::read_to_string(&config_path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            out.push(ok("config", "no config.toml: the defaults apply"));
            Config::default()
        }
        Err(e) => {
            out.push(fail(
                "config",
                format!("cannot read {}: {e}", config_path.display()),
                "make it readable by this user",
            ));
            Config::default()
        }
        Ok(text) => match Config::from_toml_str(&text) {
            Ok(c) => {
                out.push(ok("config", config_path.display().to_string()));
                c
            }
            Err(e) => {
                out.push(fail(
                    "config",
                    format!("{}: {}", config_path.display(), one_line(&e.to_string())),
                    "fix that line (`ferry config set KEY VALUE` checks values)",
                ));
                Config::default()
            }
        },
    };
    // The index.
    let db = root.join(DB_FILE);
    let index = match Index::open(&db, Duration::from_millis(config.database.busy_timeout_ms)) {
        Ok(i) => Some(i),
        Err(e) => {
            out.push(fail(
                "database",
                format!("{}: {e}", db.display()),
                "if another ferry command holds it, try again; if it is damaged, restore \
                 index.db from a backup or move it aside and add the folders again",
            ));
            None
        }
    };
    if let Some(index) = &index {
        let version = index.schema_version().unwrap_or(-1);
        match index.integrity_problems() {
            Ok(p) if p.is_empty() && version == Index::current_schema_version() => out.push(ok(
                "database",
                format!("integrity ok, schema version {version}"),
            )),
            Ok(p) if p.is_empty() => out.push(fail(
                "database",
                format!(
                    "schema version {version}, this ferry uses {}",
                    Index::current_schema_version()
                ),
                "use the ferry version that made this home",
            )),
            Ok(p) => out.push(fail(
                "database",
                format!("integrity check failed: {}", p.join("; ")),
                "stop the agent, restore index.db from a backup or move it aside and add \
                 the folders again (their files are kept)",
            )),
            Err(e) => out.push(fail(
                "database",
                format!("integrity check could not run: {e}"),
                "stop the agent and run `ferry doctor` again",
            )),
        }
    }
    // The agent.
    let agent = control::call(root, &Request::Status, Duration::from_secs(5)).ok();
    match &agent {
        Some(a) => {
            out.push(ok("agent", format!("running, pid {}", a["pid"])));
            let pending: Vec<&str> = a["config_restart_needed"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if !pending.is_empty() {
                out.push(fail(
                    "agent config",
                    format!("changed settings not in use yet: {}", pending.join(", ")),
                    "restart the agent (`ferry daemon`, or its service) to apply them",
                ));
            }
        }
        None => out.push(fail(
            "agent",
            "not running: nothing syncs",
            "start it with `ferry daemon` (or its service, e.g. `systemctl --user start ferry`)",
        )),
    }
    // The folders.
    if let Some(index) = &index {
        match index.folders() {
            Ok(folders) => {
                for f in folders {
                    let name = format!("folder {}", f.id);
                    let live = agent.as_ref().map(|a| &a["folders"][f.id.as_str()]);
                    match check_root(&f) {
                        Err(FolderError::RootMissing(p)) => out.push(fail(
                            name,
                            format!("its root {} is missing", p.display()),
                            format!(
                                "mount the disk that holds it, or `ferry folder remove {}` if it is gone for good",
                                f.id
                            ),
                        )),
                        Err(FolderError::MarkerMissing(p)) => out.push(fail(
                            name,
                            format!("{} has no .ferry marker", p.display()),
                            format!(
                                "if the right disk is mounted there, run `ferry folder remove {id}` \
                                 and `ferry folder add {} --id {id}`",
                                p.display(),
                                id = f.id
                            ),
                        )),
                        Err(e) => out.push(fail(name, e.to_string(), "see the error")),
                        Ok(()) => match live.and_then(|l| l["error"].as_str()) {
                            Some(e) => out.push(fail(
                                name,
                                format!("the agent reports: {e}"),
                                format!("see `ferry status --need {}`", f.id),
                            )),
                            None => out.push(ok(name, f.path.display().to_string())),
                        },
                    }
                }
            }
            Err(e) => out.push(fail(
                "folders",
                format!("cannot list them: {e}"),
                "see the database check",
            )),
        }
    }
    // The paired devices, as the agent sees them.
    if agent.is_some() {
        match control::call(root, &Request::Devices, Duration::from_secs(10)) {
            Ok(v) => {
                for d in v.as_array().into_iter().flatten() {
                    out.push(device_check(d));
                }
            }
            Err(e) => out.push(fail(
                "devices",
                format!("the agent did not list them: {e}"),
                "run `ferry doctor` again; if it persists, restart the agent",
            )),
        }
    }
    out
}

fn device_check(d: &Value) -> Check {
    let name = format!("device {}", d["name"].as_str().unwrap_or("?"));
    let seen = d["last_seen_at"]
        .as_i64()
        .map(|t| format!("last seen {} UTC", output::time(t)))
        .unwrap_or_else(|| "never seen".into());
    if d["connected"].as_bool().unwrap_or(false) {
        let path = match d["direct"].as_bool() {
            Some(true) => "direct",
            Some(false) => "relayed",
            None => "path unknown",
        };
        let addr = d["address"]
            .as_str()
            .map(|a| format!(" via {a}"))
            .unwrap_or_default();
        return ok(name, format!("connected, {path}{addr}"));
    }
    let error = d["last_error"]
        .as_str()
        .map(|e| format!("; last attempt: {e}"))
        .unwrap_or_default();
    fail(
        name,
        format!("not connected ({seen}){error}"),
        "check that its agent runs (`ferry doctor` there) and that the two can reach \
         each other (network, firewall; relays need `network.relays` on both)",
    )
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_not_connected_is_a_problem_with_advice() {
        let c = device_check(&serde_json::json!({
            "name": "nas", "connected": false, "last_seen_at": 0, "last_error": "timed out",
        }));
        assert!(!c.ok);
        assert_eq!(
            c.detail,
            "not connected (last seen 1970-01-01 00:00:00 UTC); last attempt: timed out"
        );
        assert!(c.advice.unwrap().contains("its agent runs"));
        let c = device_check(&serde_json::json!({
            "name": "nas", "connected": true, "direct": true, "address": "10.0.0.2:4000",
        }));
        assert!(c.ok);
        assert_eq!(c.detail, "connected, direct via 10.0.0.2:4000");
    }

    #[test]
    fn no_home_is_one_failed_check() {
        let dir = tempfile::tempdir().unwrap();
        let checks = checks(&dir.path().join("none"));
        assert_eq!(checks.len(), 1);
        assert!(!checks[0].ok);
    }
}
