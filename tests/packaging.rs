//! What the packages ship: `ferry completions SHELL` and `ferry man` run on a
//! machine with no device home and never make one, and the systemd units in
//! `packaging/` start the installed binary the way the README says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A finished `ferry` run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `ferry ARGS` with `FERRY_HOME` at `home` (which tests keep
/// non-existent) and no `--home`, as a packager's build script would.
fn ferry(home: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_HOME", home)
        .env_remove("RUST_LOG")
        .output()
        .expect("run ferry");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A temp dir and, inside it, a home path that does not exist.
fn no_home() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    (tmp, home)
}

#[track_caller]
fn assert_ok(run: &Run, what: &str) {
    assert_eq!(
        run.code, 0,
        "{what} failed\nstdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
}

#[test]
fn completions_for_each_shell_name_the_subcommands_and_need_no_home() {
    let (_tmp, home) = no_home();
    for shell in ["bash", "zsh", "fish"] {
        let run = ferry(&home, &["completions", shell]);
        assert_ok(&run, &format!("ferry completions {shell}"));
        for sub in ["status", "history", "restore", "folder", "daemon", "man"] {
            assert!(
                run.stdout.contains(sub),
                "the {shell} completions do not mention `{sub}`:\n{}",
                run.stdout
            );
        }
        assert!(
            run.stderr.is_empty(),
            "ferry completions {shell} wrote to stderr: {}",
            run.stderr
        );
        assert!(!home.exists(), "ferry completions {shell} created {home:?}");
    }
    // Each script hooks itself into its shell the way that shell expects.
    assert!(
        ferry(&home, &["completions", "bash"])
            .stdout
            .contains("complete -F _ferry")
    );
    assert!(
        ferry(&home, &["completions", "zsh"])
            .stdout
            .starts_with("#compdef ferry")
    );
    assert!(
        ferry(&home, &["completions", "fish"])
            .stdout
            .contains("complete -c ferry")
    );
}

#[test]
fn completions_for_an_unknown_shell_is_a_usage_error() {
    let (_tmp, home) = no_home();
    let run = ferry(&home, &["completions", "tcsh"]);
    assert_eq!(run.code, 2, "expected a usage error: {}", run.stderr);
    assert!(run.stdout.is_empty(), "printed a script: {}", run.stdout);
    assert!(
        run.stderr.contains("invalid value 'tcsh'") && run.stderr.contains("bash"),
        "the error names neither the bad shell nor the good ones: {}",
        run.stderr
    );
    let run = ferry(&home, &["completions"]);
    assert_eq!(
        run.code, 2,
        "a missing shell must be a usage error: {}",
        run.stderr
    );
    assert!(!home.exists());
}

#[test]
fn man_prints_the_roff_page_of_ferry_with_its_subcommands() {
    let (_tmp, home) = no_home();
    let run = ferry(&home, &["man"]);
    assert_ok(&run, "ferry man");
    let page = &run.stdout;
    assert!(
        page.lines().any(|l| l.starts_with(".TH FERRY 1")),
        "no .TH FERRY 1 header:\n{page}"
    );
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "no {section}:\n{page}");
    }
    for sub in [
        "ferry\\-status(1)",
        "ferry\\-history(1)",
        "ferry\\-restore(1)",
        "ferry\\-daemon(1)",
    ] {
        assert!(page.contains(sub), "the page does not list {sub}:\n{page}");
    }
    assert!(
        !page.contains("ferry\\-help(1)"),
        "the page lists a help page that is never written:\n{page}"
    );
    assert!(!home.exists(), "ferry man created {home:?}");
}

#[test]
fn man_dir_writes_a_page_per_command_and_lists_them() {
    let (tmp, home) = no_home();
    let dir = tmp.path().join("man").join("man1");
    let run = ferry(&home, &["man", "--dir", dir.to_str().unwrap()]);
    assert_ok(&run, "ferry man --dir");
    let listed: Vec<PathBuf> = run.stdout.lines().map(PathBuf::from).collect();
    let mut written: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    written.sort();
    assert_eq!(
        listed, written,
        "stdout does not list exactly the pages written"
    );
    for name in [
        "ferry.1",
        "ferry-status.1",
        "ferry-history.1",
        "ferry-folder-add.1",
    ] {
        assert!(
            dir.join(name).is_file(),
            "no {name} in {dir:?}: {written:?}"
        );
    }
    let status = std::fs::read_to_string(dir.join("ferry-status.1")).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with(".TH FERRY-STATUS 1")),
        "ferry-status.1 has no .TH FERRY-STATUS 1 header:\n{status}"
    );
    assert!(
        status.contains("\\-\\-need"),
        "ferry-status.1 lacks --need:\n{status}"
    );
    assert!(!home.exists(), "ferry man --dir created {home:?}");
}

#[test]
fn man_dir_that_cannot_be_made_is_an_error_naming_it() {
    let (tmp, home) = no_home();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let dir = file.join("man1");
    let run = ferry(&home, &["man", "--dir", dir.to_str().unwrap()]);
    assert_eq!(run.code, 1, "expected an error: {}", run.stderr);
    assert!(
        run.stderr.starts_with("ferry: error: ") && run.stderr.contains(dir.to_str().unwrap()),
        "the error does not name {dir:?}: {}",
        run.stderr
    );
    assert!(!home.exists());
}

/// A systemd unit file: section name to its `Key=value` lines in order (keys
/// may repeat, as `SystemCallFilter=` does).
type Unit = BTreeMap<String, Vec<(String, String)>>;

/// Parses a unit file: `[Section]` headers, `Key=value` lines, `#`/`;`
/// comments and blank lines. Panics on anything else, so a typo fails the test.
fn parse_unit(path: &Path) -> Unit {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "{path:?}:{}: continued lines are not expected",
            n + 1
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            unit.entry(name.to_owned()).or_default();
            section = Some(name.to_owned());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{path:?}:{}: not Key=value: {line}", n + 1));
        let section = section
            .as_ref()
            .unwrap_or_else(|| panic!("{path:?}:{}: a key before any section", n + 1));
        unit.get_mut(section)
            .unwrap()
            .push((key.trim().to_owned(), value.trim().to_owned()));
    }
    unit
}

/// The values of `key` in `section`, in order.
fn values<'a>(unit: &'a Unit, section: &str, key: &str) -> Vec<&'a str> {
    unit.get(section)
        .map(|entries| {
            entries
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// The one value of `key` in `section`.
#[track_caller]
fn value<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    match values(unit, section, key).as_slice() {
        [v] => v,
        other => panic!("expected one {key}= in [{section}], found {other:?}"),
    }
}

fn packaging(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(file)
}

#[test]
fn both_units_run_the_installed_daemon_and_restart_it_on_failure() {
    for file in ["ferry.service", "ferry@.service"] {
        let unit = parse_unit(&packaging(file));
        assert_eq!(
            value(&unit, "Service", "ExecStart"),
            "/usr/bin/ferry daemon",
            "{file}: real devices run the agent online, from the packaged binary"
        );
        assert_eq!(value(&unit, "Service", "Restart"), "on-failure", "{file}");
        assert_eq!(value(&unit, "Service", "NoNewPrivileges"), "yes", "{file}");
        assert_eq!(
            value(&unit, "Service", "RestrictAddressFamilies"),
            "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
            "{file}: the control socket, QUIC and the network monitor"
        );
        assert!(!value(&unit, "Unit", "Description").is_empty(), "{file}");
        assert!(!value(&unit, "Install", "WantedBy").is_empty(), "{file}");
    }
}

#[test]
fn the_user_unit_uses_no_directive_that_needs_namespaces() {
    let unit = parse_unit(&packaging("ferry.service"));
    assert!(
        values(&unit, "Service", "User").is_empty(),
        "a user unit runs as its user"
    );
    assert_eq!(value(&unit, "Install", "WantedBy"), "default.target");
    // These fail the start (226/NAMESPACE) in a user manager without
    // unprivileged user namespaces.
    for key in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateUsers",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectHostname",
        "ProtectClock",
        "ProtectProc",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "CapabilityBoundingSet",
    ] {
        assert!(
            values(&unit, "Service", key).is_empty(),
            "ferry.service sets {key}=, which needs namespaces in a user manager"
        );
    }
}

#[test]
fn the_system_template_runs_as_the_instance_user_and_can_write_homes() {
    let unit = parse_unit(&packaging("ferry@.service"));
    assert_eq!(value(&unit, "Service", "User"), "%i");
    assert_eq!(value(&unit, "Install", "WantedBy"), "multi-user.target");
    // The device home and the folders live under the user's home.
    assert_eq!(value(&unit, "Service", "ProtectHome"), "no");
    assert!(
        ["full", "true", "yes"].contains(&value(&unit, "Service", "ProtectSystem")),
        "ProtectSystem=strict would make the synced folders read-only"
    );
    for key in [
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
    ] {
        assert_eq!(value(&unit, "Service", key), "yes", "ferry@.service: {key}");
    }
    assert_eq!(value(&unit, "Service", "CapabilityBoundingSet"), "");
}
