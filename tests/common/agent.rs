//! Real agents on loopback for end-to-end tests: device homes in a temp
//! directory, `ferry daemon` child processes stopped with SIGTERM, CLI runs with
//! an upper time limit, and a poller for conditions that become true eventually.
//!
//! Timeouts here are only upper bounds against hangs, never assertions about
//! speed: a loaded machine may be slow, a broken one never gets there.

// Each test crate that includes this module uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ferry::daemon::control::{self, Request};
use serde_json::Value;

/// The longest a test waits for anything; reached only when something is broken.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// How long one CLI command may take (a join may take up to 60 s by design).
const COMMAND_LIMIT: Duration = Duration::from_secs(90);

/// What a finished `ferry` command did.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub args: Vec<String>,
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Asserts success.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success: {self}");
        self
    }

    /// Asserts exit code `code`.
    #[track_caller]
    pub fn exits(self, code: i32) -> Self {
        assert_eq!(self.code, code, "expected exit code {code}: {self}");
        self
    }

    /// Standard output as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }

    /// The error message, asserting that standard error holds exactly one line.
    #[track_caller]
    pub fn error_line(&self) -> String {
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected a one-line error: {self}");
        lines[0].to_owned()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`ferry {}` exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `ferry --home HOME ARGS…` to completion (at most [`COMMAND_LIMIT`]).
pub fn ferry(home: &Path, args: &[&str]) -> Run {
    ferry_within(home, args, COMMAND_LIMIT)
}

/// Runs `ferry --home HOME ARGS…`, killing it and failing the test after `limit`.
pub fn ferry_within(home: &Path, args: &[&str], limit: Duration) -> Run {
    let mut out = tempfile::tempfile().expect("temp file for stdout");
    let mut err = tempfile::tempfile().expect("temp file for stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("FERRY_HOME")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone stdout file"))
        .stderr(err.try_clone().expect("clone stderr file"))
        .spawn()
        .expect("spawn ferry");
    let status = wait_within(&mut child, limit);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "`ferry {}` did not finish within {limit:?}; stderr so far:\n{}",
            args.join(" "),
            read_all(&mut err)
        );
    };
    Run {
        args,
        code: status.code().unwrap_or(-1),
        stdout: read_all(&mut out),
        stderr: read_all(&mut err),
    }
}

fn read_all(f: &mut File) -> String {
    let mut bytes = Vec::new();
    f.seek(SeekFrom::Start(0)).expect("rewind output file");
    f.read_to_end(&mut bytes).expect("read output file");
    String::from_utf8_lossy(&bytes).into_owned()
}

fn wait_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child process") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Spawns `cmd` (the ferry binary, or a wrapper that execs it) as `node`'s
/// agent on loopback, offline, its stderr appended to the node's log after
/// `banner`; returns at once, without waiting for it to answer.
pub fn spawn_daemon(node: &Node, mut cmd: Command, banner: &str) -> Child {
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&node.log)
        .expect("open agent log");
    writeln!(log, "{banner}").expect("write agent log");
    // FERRY_TEST_LOG=ferry=debug (any filter) for more detail when chasing a failure.
    let level = std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "info".to_owned());
    cmd.arg("--home")
        .arg(&node.home)
        .args([
            "--log-level",
            &level,
            "daemon",
            "--offline",
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("FERRY_HOME")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn ferry daemon")
}

/// Polls `f` until it returns `Some`, failing the test after [`PATIENCE`].
#[track_caller]
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "gave up after {PATIENCE:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `cond` until it holds, failing the test after [`PATIENCE`].
#[track_caller]
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(what, || cond().then_some(()))
}

/// A temp directory holding device homes; prints every agent log if the test
/// fails. Declare it before the agents so that they stop first.
pub struct Lab {
    tmp: tempfile::TempDir,
    logs: std::cell::RefCell<Vec<PathBuf>>,
}

impl Lab {
    /// A fresh, empty lab.
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().expect("temp dir"),
            logs: Default::default(),
        }
    }

    /// A new device home `<tmp>/NAME/home`, initialised with `--name NAME`, with
    /// mDNS turned off (no multicast on loopback here).
    pub fn node(&self, name: &str) -> Node {
        let dir = self.tmp.path().join(name);
        fs::create_dir_all(&dir).expect("create node dir");
        let node = Node {
            name: name.to_owned(),
            home: dir.join("home"),
            log: dir.join("agent.log"),
            dir,
        };
        node.run(&["init", "--name", name]).ok();
        let config_path = node.home.join("config.toml");
        let config = fs::read_to_string(&config_path).expect("read config");
        let offline = config.replace("local_discovery = true", "local_discovery = false");
        assert_ne!(config, offline, "no `local_discovery = true` in {config}");
        fs::write(&config_path, offline).expect("write config");
        self.logs.borrow_mut().push(node.log.clone());
        node
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for log in self.logs.borrow().iter() {
            if let Ok(text) = fs::read_to_string(log) {
                eprintln!("===== {} =====\n{text}", log.display());
            }
        }
    }
}

/// One device: its home, a directory for its folders, its agent's log.
#[derive(Debug, Clone)]
pub struct Node {
    /// The name given at init.
    pub name: String,
    /// The device home.
    pub home: PathBuf,
    /// A directory of this node's own, for folders.
    pub dir: PathBuf,
    /// Where its agents write stderr (appended across restarts).
    pub log: PathBuf,
}

impl Node {
    /// Runs a ferry command on this home.
    pub fn run(&self, args: &[&str]) -> Run {
        ferry(&self.home, args)
    }

    /// `<dir>/NAME`, created empty.
    pub fn folder_dir(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        fs::create_dir_all(&p).expect("create folder dir");
        p
    }

    /// `<dir>/NAME`, not created.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Adds `<dir>/ID` as folder ID.
    pub fn add_folder(&self, id: &str) -> PathBuf {
        let p = self.folder_dir(id);
        self.run(&["folder", "add", p.to_str().expect("utf-8 path"), "--id", id])
            .ok();
        p
    }

    /// This device's id.
    pub fn id(&self) -> String {
        self.run(&["id"]).ok().stdout.trim().to_owned()
    }

    /// `ferry invite ARGS…`, returning the code.
    pub fn invite(&self, args: &[&str]) -> String {
        let mut all = vec!["invite"];
        all.extend_from_slice(args);
        let run = self.run(&all).ok();
        let code = run.stdout.trim().to_owned();
        assert!(
            code.starts_with("ferry1-") && !code.contains('\n'),
            "not one code line: {run}"
        );
        code
    }

    /// `ferry devices --json`.
    pub fn devices(&self) -> Vec<Value> {
        let run = self.run(&["devices", "--json"]).ok();
        run.json()
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("devices is not an array: {run}"))
    }

    /// The `devices --json` entry of device `id`, if listed.
    pub fn device(&self, id: &str) -> Option<Value> {
        self.devices().into_iter().find(|d| d["id"] == id)
    }

    /// Whether device `id` is listed and connected.
    pub fn connected_to(&self, id: &str) -> bool {
        self.device(id).is_some_and(|d| d["connected"] == true)
    }

    /// `ferry status --json`.
    pub fn status(&self) -> Value {
        self.run(&["status", "--json"]).ok().json()
    }

    /// The running agent's count of refused sync links.
    pub fn refused_links(&self) -> u64 {
        let s = self.status();
        s["agent"]["refused_links"]
            .as_u64()
            .unwrap_or_else(|| panic!("no agent.refused_links in {s}"))
    }

    /// The pending folder offers (`status --json`).
    pub fn offers(&self) -> Vec<Value> {
        self.status()["offers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `ferry folder list --json`.
    pub fn folders(&self) -> Vec<Value> {
        self.run(&["folder", "list", "--json"])
            .ok()
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Replaces `from` with `to` in the config file (which must hold `from`);
    /// takes effect at the next agent start.
    pub fn edit_config(&self, from: &str, to: &str) {
        let path = self.home.join("config.toml");
        let text = fs::read_to_string(&path).expect("read config");
        assert!(text.contains(from), "no {from:?} in {text}");
        fs::write(&path, text.replacen(from, to, 1)).expect("write config");
    }

    /// The UDP port the agent remembered in `agent.port`.
    pub fn port(&self) -> u16 {
        let text = fs::read_to_string(self.home.join("agent.port")).expect("read agent.port");
        text.trim().parse().expect("agent.port holds a port")
    }
}

/// A running `ferry daemon --offline --listen 127.0.0.1:0`; SIGTERM on drop.
pub struct Agent {
    child: Option<Child>,
    node: Node,
}

impl Agent {
    /// Starts the agent of `node` and waits until its control socket answers.
    pub fn start(node: &Node) -> Self {
        Self::start_in(node, Command::new(env!("CARGO_BIN_EXE_ferry")))
    }

    /// Starts the agent in a user namespace of its own whose inotify watch
    /// limit is `watches` (`None` when the machine does not allow user
    /// namespaces).
    pub fn start_with_watch_limit(node: &Node, watches: u32) -> Option<Self> {
        let probe = Command::new("unshare")
            .args([
                "-Ur",
                "sh",
                "-c",
                "echo 1 > /proc/sys/user/max_inotify_watches",
            ])
            .status();
        if !probe.is_ok_and(|s| s.success()) {
            return None;
        }
        let mut cmd = Command::new("unshare");
        cmd.args([
            "-Ur",
            "sh",
            "-c",
            &format!("echo {watches} > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_ferry"),
        ]);
        Some(Self::start_in(node, cmd))
    }

    fn start_in(node: &Node, cmd: Command) -> Self {
        let child = spawn_daemon(node, cmd, "----- starting the agent -----");
        let mut agent = Self {
            child: Some(child),
            node: node.clone(),
        };
        let pid = agent.pid();
        wait_until(&format!("the agent of {} answers", node.name), || {
            if let Some(status) = agent.child_mut().try_wait().expect("wait for the agent") {
                panic!(
                    "the agent of {} exited with {status} before it was ready:\n{}",
                    node.name,
                    fs::read_to_string(&node.log).unwrap_or_default()
                );
            }
            control::call(&node.home, &Request::Status, Duration::from_secs(5))
                .is_ok_and(|v| v["pid"] == pid)
        });
        agent
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the agent runs")
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent runs").id()
    }

    /// Stops the agent with SIGTERM and asserts that it exits with code 0.
    #[track_caller]
    pub fn stop(self) {
        self.stop_with(libc::SIGTERM);
    }

    /// Stops the agent with signal `sig` and asserts that it exits with code 0.
    #[track_caller]
    pub fn stop_with(mut self, sig: libc::c_int) {
        let mut child = self.child.take().expect("the agent runs");
        signal(&child, sig);
        let Some(status) = wait_within(&mut child, PATIENCE) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the agent of {} did not stop within {PATIENCE:?} of signal {sig}",
                self.node.name
            );
        };
        assert_eq!(
            status.code(),
            Some(0),
            "the agent of {} stopped with {status} (signal {:?})",
            self.node.name,
            status.signal()
        );
    }

    /// Freezes the agent with SIGSTOP, as a laptop's closed lid would: it
    /// answers nothing until [`Agent::resume`], and its peers' links to it
    /// stall.
    pub fn pause(&self) {
        signal(self.child.as_ref().expect("the agent runs"), libc::SIGSTOP);
    }

    /// Lets an agent frozen by [`Agent::pause`] run again (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.as_ref().expect("the agent runs"), libc::SIGCONT);
    }

    /// Kills the agent with SIGKILL, as a crash would.
    pub fn crash(mut self) {
        let mut child = self.child.take().expect("the agent runs");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(&child, libc::SIGTERM);
        // A paused agent takes the SIGTERM only once it runs again.
        signal(&child, libc::SIGCONT);
        if wait_within(&mut child, Duration::from_secs(10)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on the pid of a child we have not reaped yet, so the pid
    // cannot have been reused by another process.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// Two nodes `a` and `b` with running agents, paired, sharing folder `docs`:
/// returns them, their agents, A's folder and B's.
pub fn two(lab: &Lab) -> (Node, Node, Agent, Agent, PathBuf, PathBuf) {
    let a = lab.node("a");
    let b = lab.node("b");
    let a_docs = a.add_folder("docs");
    let b_docs = b.path("docs");
    let (aa, ab) = (Agent::start(&a), Agent::start(&b));
    pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", b_docs.to_str().expect("UTF-8 temp path")],
    );
    (a, b, aa, ab, a_docs, b_docs)
}

/// Pairs `joiner` with `inviter` (both agents running) with `invite_args` and
/// `join_args`, and waits until each lists the other as connected.
pub fn pair(inviter: &Node, joiner: &Node, invite_args: &[&str], join_args: &[&str]) -> Run {
    let code = inviter.invite(invite_args);
    let mut args = vec!["join", code.as_str()];
    args.extend_from_slice(join_args);
    let run = joiner.run(&args).ok();
    wait_linked(inviter, joiner);
    run
}

/// Waits until `a` and `b` both list each other as connected.
pub fn wait_linked(a: &Node, b: &Node) {
    let (a_id, b_id) = (a.id(), b.id());
    wait_until(
        &format!("{} and {} list each other as connected", a.name, b.name),
        || a.connected_to(&b_id) && b.connected_to(&a_id),
    );
}

/// Deterministic incompressible bytes (xorshift), for file contents.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// What a tree holds, as sync must reproduce it: per relative path, the kind,
/// the content (files) or target (links), permissions, and mtime (files).
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The tree can change while it is walked (an agent applying deletes, a
/// conflict copy appearing): an entry that vanishes between `read_dir` and
/// its `lstat` or read is left out of this snapshot, as if the walk had come
/// a moment later; callers that wait for two trees to match simply look
/// again. Any other error is a test failure.
fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    let Some(entries) = gone_is_none(fs::read_dir(dir), "read dir") else {
        return;
    };
    for e in entries {
        let Some(e) = gone_is_none(e, "dir entry") else {
            continue;
        };
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if rel == ".ferry" {
            continue;
        }
        let Some(m) = gone_is_none(fs::symlink_metadata(&p), "lstat") else {
            continue;
        };
        let desc = if m.file_type().is_symlink() {
            let Some(target) = gone_is_none(fs::read_link(&p), "readlink") else {
                continue;
            };
            format!("link -> {}", target.display())
        } else if m.is_dir() {
            walk(root, &p, out);
            format!("dir {:o}", m.mode() & 0o7777)
        } else {
            let Some(bytes) = gone_is_none(fs::read(&p), "read file") else {
                continue;
            };
            format!(
                "file {:o} mtime {}.{:09} {}",
                m.mode() & 0o7777,
                m.mtime(),
                m.mtime_nsec(),
                blake3::hash(&bytes).to_hex()
            )
        };
        out.insert(rel, desc);
    }
}

/// `Some(value)`, `None` when the entry no longer exists, a panic naming
/// `what` for any other error.
fn gone_is_none<T>(r: std::io::Result<T>, what: &str) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// splitmix64: a small, fast, well-mixed generator, fully determined by its
/// seed, for tests that pick random operations and moments reproducibly.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        self.next() % n
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "between({lo}, {hi})");
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One of `items`, if there are any.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        let i = self.below(items.len() as u64) as usize;
        Some(&items[i])
    }

    /// A duration of `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.between(lo, hi))
    }

    /// Shuffles `v` in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.between(0, i as u64) as usize;
            v.swap(i, j);
        }
    }
}

/// The environment variable `name` as a number (decimal or `0x` hex, `_`
/// allowed), or `default` when it is unset.
#[track_caller]
pub fn env_number(name: &str, default: u64) -> u64 {
    let Ok(text) = std::env::var(name) else {
        return default;
    };
    let t = text.trim().replace('_', "");
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.unwrap_or_else(|e| panic!("{name}={text:?} is not a number: {e}"))
}
