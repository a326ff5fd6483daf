//! End-to-end scenarios with real agents: `ferry daemon` processes on loopback,
//! paired, restarted, unpaired and dialled by strangers, driven through the CLI.

#[path = "common/agent.rs"]
mod harness;

use std::collections::HashSet;
use std::error::Error as _;
use std::net::SocketAddr;
use std::time::Duration;

use ferry::config::NetworkConfig;
use ferry::daemon::control::{self, Request};
use ferry::device::DeviceId;
use ferry::pairing::code::InviteCode;
use ferry::protocol::SYNC_ALPN;
use ferry::transport::{self, AllowList, CLOSE_UNKNOWN_DEVICE};
use iroh::endpoint::{ConnectionError, VarInt};
use iroh::{EndpointAddr, PublicKey, SecretKey};
use serde_json::Value;

use harness::{Agent, Lab, Node, PATIENCE, pair, wait_for, wait_linked, wait_until};

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn canonical(p: &std::path::Path) -> String {
    std::fs::canonicalize(p)
        .expect("canonicalize")
        .to_str()
        .expect("utf-8 path")
        .to_owned()
}

/// A well-formed, unexpired code for `inviter` at `addr` that no agent issued.
fn forged_code(inviter: PublicKey, addr: SocketAddr) -> String {
    InviteCode::new(inviter, vec![addr], None, now_secs() + 600).encode()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn pair_restart_reconnect() {
    let lab = Lab::new();
    let (a, b) = (lab.node("alice"), lab.node("bob"));
    let docs = a.add_folder("docs");
    std::fs::write(docs.join("hello.txt"), b"hello").unwrap();
    let (a_id, b_id) = (a.id(), b.id());
    let agent_a = Agent::start(&a);
    let agent_b = Agent::start(&b);

    let into = b.path("from-alice");
    let joined = pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", into.to_str().unwrap()],
    );
    assert!(
        joined.stdout.contains("Paired with alice")
            && joined.stdout.contains("Sharing folder docs"),
        "{joined}"
    );
    let b_folders = b.folders();
    let docs_on_b = b_folders
        .iter()
        .find(|f| f["id"] == "docs")
        .unwrap_or_else(|| panic!("bob lacks folder docs: {b_folders:?}"));
    assert_eq!(docs_on_b["path"], canonical(&into));
    // A joined folder has a vault secret from the start.
    let key = b.run(&["folder", "key", "docs"]).ok();
    assert!(key.stdout.starts_with("ferrykey1-"), "{key}");
    let seen_by_a = a.device(&b_id).expect("alice lists bob");
    assert_eq!(seen_by_a["name"], "bob");
    assert_eq!(seen_by_a["direct"], true, "{seen_by_a}");
    assert!(
        seen_by_a["address"]
            .as_str()
            .is_some_and(|s| s.starts_with("127.0.0.1:")),
        "{seen_by_a}"
    );
    assert_eq!(b.device(&a_id).expect("bob lists alice")["name"], "alice");

    agent_a.stop();
    agent_b.stop();
    assert_eq!(a.id(), a_id);
    assert_eq!(b.id(), b_id);

    let _agent_a = Agent::start(&a);
    let _agent_b = Agent::start(&b);
    wait_linked(&a, &b);
    assert_eq!(a.devices().len(), 1);
    assert_eq!(b.devices().len(), 1);
    assert_eq!(a.device(&b_id).unwrap()["name"], "bob");
    assert_eq!(b.device(&a_id).unwrap()["name"], "alice");
    assert!(b.folders().iter().any(|f| f["id"] == "docs"));
}

/// Dials `target` at `addr` on the sync ALPN with a fresh key and returns how
/// the connection ended.
fn dial_as_stranger(target: PublicKey, addr: SocketAddr) -> ConnectionError {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let mut net = NetworkConfig::default().offline();
        net.local_discovery = false;
        // The hook checks outgoing links too: the stranger allows its target.
        let allow = AllowList::default();
        allow.insert(DeviceId::new(target));
        let ep = transport::bind(SecretKey::generate(), &net, loopback(0), allow)
            .await
            .expect("bind a stranger's endpoint");
        let outcome = tokio::time::timeout(PATIENCE, async {
            match ep
                .connect(EndpointAddr::new(target).with_ip_addr(addr), SYNC_ALPN)
                .await
            {
                Ok(conn) => conn.closed().await,
                Err(e) => {
                    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.source();
                    while let Some(c) = cause {
                        if let Some(ce) = c.downcast_ref::<ConnectionError>() {
                            return ce.clone();
                        }
                        cause = c.source();
                    }
                    panic!("the dial failed before the agent could refuse it: {e}");
                }
            }
        })
        .await
        .expect("the agent neither closed nor refused the link");
        ep.close().await;
        outcome
    })
}

#[test]
fn unpaired_device_is_refused() {
    let lab = Lab::new();
    let a = lab.node("alice");
    let _agent = Agent::start(&a);
    let key: PublicKey = a.id().parse().unwrap();
    let before = a.refused_links();

    match dial_as_stranger(key, loopback(a.port())) {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, VarInt::from_u32(CLOSE_UNKNOWN_DEVICE));
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("unknown device"), "{reason}");
        }
        other => panic!("expected a refusal with code {CLOSE_UNKNOWN_DEVICE}, got {other}"),
    }
    wait_until("alice counts the refused link", || {
        a.refused_links() > before
    });
    assert!(a.devices().is_empty());
}

#[test]
fn removed_device_is_refused() {
    let lab = Lab::new();
    let (a, b) = (lab.node("alice"), lab.node("bob"));
    let (a_id, b_id) = (a.id(), b.id());
    let agent_a = Agent::start(&a);
    let agent_b = Agent::start(&b);
    pair(&a, &b, &[], &[]);
    let before = a.refused_links();

    let removed = a.run(&["device", "remove", &b_id]).ok();
    assert!(removed.stdout.contains("Removed device"), "{removed}");
    assert!(a.devices().is_empty());
    wait_until("bob sees alice offline, with a reason", || {
        b.device(&a_id)
            .is_some_and(|d| d["connected"] == false && d["last_error"].is_string())
    });
    wait_until("alice refuses bob's links", || a.refused_links() > before);
    assert!(a.devices().is_empty());
    let again = a.run(&["device", "remove", &b_id]).exits(1);
    assert!(again.error_line().contains("no paired device"), "{again}");

    agent_a.stop();
    let _agent_a = Agent::start(&a);
    // Bob, refused, now asks only once a minute; a restart makes him dial at
    // once, and the restarted agent refuses him too.
    agent_b.stop();
    let _agent_b = Agent::start(&b);
    wait_until("the restarted alice refuses bob", || a.refused_links() >= 1);
    assert!(a.devices().is_empty());
    // Polled rather than sampled once: a refused link can show as connected
    // for an instant (see `refused_link_is_never_reported_connected`).
    wait_until("bob still lists alice, offline", || {
        b.device(&a_id).is_some_and(|d| d["connected"] == false)
    });
}

/// The device with the smaller id, when removed, redials the device that
/// removed it without any delay: every dial completes the QUIC handshake
/// before the refusal, and `Peers::maintain` resets its backoff on any
/// completed dial.
#[test]
fn removed_device_backs_off() {
    let lab = Lab::new();
    let (a, b) = (lab.node("alice"), lab.node("bob"));
    let _agent_a = Agent::start(&a);
    let _agent_b = Agent::start(&b);
    pair(&a, &b, &[], &[]);
    // The larger id removes the smaller one, which dials without a yield delay.
    let (remover, removed) = if a.id() > b.id() { (&a, &b) } else { (&b, &a) };
    remover.run(&["device", "remove", &removed.id()]).ok();
    wait_until("the removed device is refused once", || {
        remover.refused_links() >= 1
    });
    let start = remover.refused_links();
    std::thread::sleep(Duration::from_secs(6));
    let attempts = remover.refused_links() - start;
    // Backoff from 1 s doubling allows at most 3 attempts in 6 s (1 + 2 + 4 > 6).
    assert!(
        attempts <= 4,
        "{attempts} refused links in 6 s: the removed device redials without backoff"
    );
}

/// While a refused link's hello fails, the link sits in the table of links and
/// `devices` reports the peer as connected.
#[test]
fn refused_link_is_never_reported_connected() {
    let lab = Lab::new();
    let (a, b) = (lab.node("alice"), lab.node("bob"));
    let _agent_a = Agent::start(&a);
    let _agent_b = Agent::start(&b);
    pair(&a, &b, &[], &[]);
    let (remover, removed) = if a.id() > b.id() { (&a, &b) } else { (&b, &a) };
    let remover_id = remover.id();
    remover.run(&["device", "remove", &removed.id()]).ok();
    wait_until("the removed device sees the link down", || {
        !removed.connected_to(&remover_id)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (mut samples, mut connected) = (0, 0);
    while std::time::Instant::now() < deadline {
        let list = control::call(&removed.home, &Request::Devices, Duration::from_secs(5))
            .expect("devices");
        samples += 1;
        if list
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == remover_id.as_str() && d["connected"] == true)
        {
            connected += 1;
        }
    }
    assert_eq!(
        connected, 0,
        "{connected} of {samples} samples show the refused peer connected"
    );
}

/// The reason a removed device's links fail is in the peer's close frame, but
/// the hello's read error ("link error: connection lost") is what gets recorded.
#[test]
fn removed_device_is_told_why() {
    let lab = Lab::new();
    let (a, b) = (lab.node("alice"), lab.node("bob"));
    let a_id = a.id();
    let _agent_a = Agent::start(&a);
    let _agent_b = Agent::start(&b);
    pair(&a, &b, &[], &[]);
    a.run(&["device", "remove", &b.id()]).ok();
    wait_until("alice refuses bob once", || a.refused_links() >= 1);
    let mut reasons = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < deadline {
        if let Some(e) = b
            .device(&a_id)
            .and_then(|d| d["last_error"].as_str().map(String::from))
        {
            reasons.insert(e);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!reasons.is_empty());
    for r in &reasons {
        assert!(
            r.contains("unknown device") || r.contains("device removed"),
            "bob is not told why alice refuses him: {reasons:?}"
        );
    }
}

/// `ferry devices --json | grep -q ...` makes ferry panic: Rust ignores
/// SIGPIPE, so `println!` meets EPIPE and panics with exit code 101.
#[test]
fn closed_stdout_is_not_a_crash() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let lab = Lab::new();
    let a = lab.node("alice");
    let _agent = Agent::start(&a);
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two fresh descriptors, which are owned from here on.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--home")
        .arg(&a.home)
        .args(["devices", "--json"])
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run ferry");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && out.status.code() != Some(101),
        "{:?}: {stderr}",
        out.status
    );
}

#[test]
fn bad_codes() {
    let lab = Lab::new();
    let (a, b, c) = (lab.node("alice"), lab.node("bob"), lab.node("carol"));
    let (a_id, b_id) = (a.id(), b.id());
    let _agent_a = Agent::start(&a);
    let _agent_b = Agent::start(&b);
    let code = a.invite(&[]);
    let mut messages = Vec::new();
    let mut refused = |node: &Node, code: &str, needle: &str| {
        let run = node.run(&["join", code]).exits(1);
        let line = run.error_line();
        assert!(
            line.to_lowercase().contains(needle),
            "expected {needle:?} in: {run}"
        );
        messages.push(line);
    };

    // One character changed, to another base32 letter, in the middle.
    let mut chars: Vec<char> = code.chars().collect();
    let i = chars.len() / 2;
    let i = (i..chars.len())
        .find(|&i| chars[i].is_ascii_lowercase())
        .unwrap();
    chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
    let typo: String = chars.into_iter().collect();
    refused(&b, &typo, "checksum");
    refused(&b, "hello-world", "not a ferry invite code");
    refused(&b, &code.replacen("ferry1", "ferry2", 1), "version 2");
    refused(&b, &code[..code.len() - 10], "incomplete");
    refused(&a, &code, "made by this device");
    let forged = forged_code(a_id.parse().unwrap(), loopback(a.port()));
    refused(&b, &forged, "does not know this code");

    let short = a.invite(&["--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    refused(&b, &short, "expired");

    assert!(a.devices().is_empty(), "{:?}", a.devices());
    assert!(b.devices().is_empty(), "{:?}", b.devices());

    b.run(&["join", &code]).ok();
    wait_linked(&a, &b);
    let _agent_c = Agent::start(&c);
    refused(&c, &code, "already been used");
    assert!(c.devices().is_empty(), "{:?}", c.devices());
    let on_a: Vec<Value> = a.devices();
    assert_eq!(on_a.len(), 1, "{on_a:?}");
    assert_eq!(on_a[0]["id"], b_id);

    let distinct: HashSet<&String> = messages.iter().collect();
    assert_eq!(distinct.len(), messages.len(), "{messages:#?}");
}

#[test]
fn agent_lock_and_no_agent() {
    let lab = Lab::new();
    let a = lab.node("alice");
    a.add_folder("docs");
    let agent = Agent::start(&a);

    let second = harness::ferry_within(
        &a.home,
        &["daemon", "--offline", "--listen", "127.0.0.1:0"],
        PATIENCE,
    );
    assert_ne!(second.code, 0, "{second}");
    assert!(second.error_line().contains("already running"), "{second}");
    assert!(
        second.stderr.contains(&agent.pid().to_string()),
        "the message names the running agent's pid: {second}"
    );
    assert_eq!(a.status()["agent"]["pid"], agent.pid());
    agent.stop_with(libc::SIGINT);

    let stranger = SecretKey::generate().public();
    let code = forged_code(stranger, loopback(9));
    let commands: [&[&str]; 6] = [
        &["devices"],
        &["devices", "--json"],
        &["invite"],
        &["join", &code],
        &["share", "docs", &stranger.to_string()],
        &["device", "remove", &stranger.to_string()],
    ];
    let no_agent = |a: &Node| {
        for args in commands {
            let run = a.run(args).exits(3);
            assert!(run.error_line().contains("agent is not running"), "{run}");
        }
    };
    no_agent(&a);
    assert!(a.status()["agent"].is_null());

    // A crashed agent leaves its socket behind, which neither fools the CLI
    // nor blocks the next agent.
    Agent::start(&a).crash();
    assert!(a.home.join("agent.sock").exists());
    no_agent(&a);
    let agent = Agent::start(&a);
    assert_eq!(a.status()["agent"]["pid"], agent.pid());
}

#[test]
fn share_offer_accept() {
    let lab = Lab::new();
    let (a, b) = (lab.node("alice"), lab.node("bob"));
    let (a_id, b_id) = (a.id(), b.id());
    let _agent_a = Agent::start(&a);
    let agent_b = Agent::start(&b);
    pair(&a, &b, &[], &[]);
    assert!(b.offers().is_empty());

    let offer_of = |folder: &'static str| {
        wait_for(&format!("bob sees the offer of {folder}"), || {
            b.offers().into_iter().find(|o| o["folder_id"] == folder)
        })
    };

    a.add_folder("photos");
    a.run(&["share", "photos", &b_id]).ok();
    let offer = offer_of("photos");
    assert_eq!(offer["device"], a_id);
    assert_eq!(offer["device_name"], "alice");
    assert_eq!(offer["label"], "photos");
    let human = b.run(&["status"]).ok();
    assert!(
        human.stdout.contains("alice offers folder photos"),
        "{human}"
    );

    let into = b.path("alice-photos");
    let n = offer["id"].to_string();
    b.run(&["folder", "accept", &n, "--into", into.to_str().unwrap()])
        .ok();
    let photos = b.folders().into_iter().find(|f| f["id"] == "photos");
    assert_eq!(
        photos.expect("bob has photos")["path"],
        canonical(&into).as_str()
    );
    assert!(b.offers().is_empty(), "{:?}", b.offers());
    let key = b.run(&["folder", "key", "photos"]).ok();
    assert!(key.stdout.starts_with("ferrykey1-"), "{key}");

    a.add_folder("music");
    a.run(&["share", "music", &b_id]).ok();
    let n = offer_of("music")["id"].to_string();
    b.run(&["folder", "decline", &n]).ok();
    assert!(b.offers().is_empty(), "{:?}", b.offers());
    b.run(&["folder", "decline", &n]).exits(1);
    // A later announcement does not bring the declined offer back.
    a.add_folder("videos");
    a.run(&["share", "videos", &b_id]).ok();
    offer_of("videos");
    let ids: Vec<Value> = b.offers().iter().map(|o| o["folder_id"].clone()).collect();
    assert_eq!(ids, ["videos"], "{:?}", b.offers());
    assert!(!b.folders().iter().any(|f| f["id"] == "music"));

    let nope = a.run(&["share", "nosuch", &b_id]).exits(1);
    assert!(nope.error_line().contains("no folder"), "{nope}");
    let stranger = SecretKey::generate().public().to_string();
    let nope = a.run(&["share", "photos", &stranger]).exits(1);
    assert!(nope.error_line().contains("no paired device"), "{nope}");

    // An offer made while bob is offline reaches him when he is back.
    agent_b.stop();
    a.add_folder("notes");
    a.run(&["share", "notes", &b_id]).ok();
    let _agent_b = Agent::start(&b);
    assert_eq!(offer_of("notes")["device"], a_id);
}

#[test]
fn join_fails_cleanly_while_the_inviter_is_offline() {
    let lab = Lab::new();
    let (a, b) = (lab.node("alice"), lab.node("bob"));
    let a_id = a.id();
    let agent_a = Agent::start(&a);
    let _agent_b = Agent::start(&b);
    let code = a.invite(&[]);
    agent_a.stop();

    let run = b.run(&["join", &code]).exits(1);
    let line = run.error_line();
    assert!(
        line.contains("cannot reach device") && line.contains(&a_id),
        "{run}"
    );
    assert!(b.devices().is_empty());

    // Pending invites live in the agent's memory: a restart cancels them.
    let _agent_a = Agent::start(&a);
    let run = b.run(&["join", &code]).exits(1);
    assert!(
        run.error_line().contains("does not know this code"),
        "{run}"
    );
    assert!(a.devices().is_empty());
    assert!(b.devices().is_empty());
}
