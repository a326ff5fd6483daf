//! `ferry daemon`, and the commands that talk to the running agent: `invite`,
//! `join`, `devices`, `device remove`, `share`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use serde_json::Value;

use super::output;
use crate::daemon::control::{self, Request};
use crate::daemon::{self, DaemonOptions};
use crate::home::Home;
use crate::index::now_secs;
use crate::pairing::code::{InviteCode, render_qr};

/// How long a quick request to the agent may take.
const QUICK: Duration = Duration::from_secs(10);
/// How long a join may take (dialling plus the handshake).
const SLOW: Duration = Duration::from_secs(60);
/// How long `ferry recover` waits for the agent to fetch a whole folder.
const RECOVER: Duration = Duration::from_secs(24 * 3600);

/// `ferry device …`
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Unpair a device: its links are refused from now on.
    Remove {
        /// The device id.
        id: String,
    },
}

pub(super) fn daemon(
    home: &Home,
    offline: bool,
    listen: Option<SocketAddr>,
) -> anyhow::Result<i32> {
    // glibc gives each thread that allocates its own arena (up to 8 per
    // core), and freed memory stays in them: two arenas cut the agent's peak
    // RSS in the 10,000-file sync from about 90 to 71 MiB (benches/sync.sh).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before the
    // agent starts its threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var(ASYNC_THREADS_VAR).ok();
    let workers = async_workers(threads.as_deref(), cores).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("ferry-agent")
        // Index calls, fsyncs and file hashing run on the blocking pool; a
        // small pool keeps memory flat (every thread brings its own malloc
        // arena) at no cost in speed on the disks and cores we run on.
        .max_blocking_threads(16)
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::run(home.clone(), DaemonOptions { offline, listen }))?;
    Ok(super::EXIT_OK)
}

/// The environment variable that sets the agent's async worker threads.
const ASYNC_THREADS_VAR: &str = "FERRY_ASYNC_THREADS";

/// The agent's async worker threads: `set` (from [`ASYNC_THREADS_VAR`]) or,
/// unset, half of the machine's `cores`, at least one. The async side
/// multiplexes links, streams and timers; hashing, disk writes, fsyncs and
/// index calls run on the blocking pool and the verify threads. Measured
/// with `benches/sync.sh` on a 2-core VM, 6 alternated pairs: one worker
/// instead of two took the 1 GiB file in 1.71-2.27 s instead of 1.99-2.71 s,
/// with about 13% less CPU (median), and a tenth of the context switches
/// (tokio wakes an idle worker to steal each task woken); the 10,000 small
/// files took as long, within the noise (8 pairs). One worker carries
/// 700-800 MB/s here, more than a 2.5 Gb/s link.
fn async_workers(set: Option<&str>, cores: usize) -> Result<usize, String> {
    match set {
        None => Ok((cores / 2).max(1)),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => Err(format!(
                "{ASYNC_THREADS_VAR}={v:?} is not a number of threads: use 1 to 1024, \
                 or leave it unset for half the cores ({})",
                (cores / 2).max(1)
            )),
        },
    }
}

/// Parses `90s`, `10m`, `2h`, `7d` (a bare number is seconds).
pub(super) fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 90s, 10m, 2h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: use e.g. 90s, 10m, 2h or 7d"
            ));
        }
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("invalid duration {s:?}"))
}

fn call(home: &Path, req: &Request, timeout: Duration) -> anyhow::Result<Value> {
    Ok(control::call(home, req, timeout)?)
}

pub(super) fn invite(
    home: &Home,
    folder: Option<String>,
    encrypted: bool,
    expires: u64,
) -> anyhow::Result<i32> {
    let v = call(
        home.root(),
        &Request::Invite {
            folder: folder.clone(),
            encrypted,
            expires_secs: expires,
        },
        QUICK,
    )?;
    let code = v["code"].as_str().unwrap_or_default();
    let expires_at = v["expires_at"].as_i64().unwrap_or_default();
    if std::io::stdout().is_terminal()
        && let Some(qr) = render_qr(code)
    {
        println!("{qr}");
    }
    println!("{code}");
    eprintln!();
    eprintln!(
        "On the other device run:  ferry join {code}{}",
        if folder.is_some() && !encrypted {
            " --into PATH"
        } else {
            ""
        }
    );
    eprintln!(
        "The code works once and expires at {} UTC.",
        output::time(expires_at)
    );
    Ok(super::EXIT_OK)
}

pub(super) fn join(
    home: &Home,
    code: &str,
    into: Option<PathBuf>,
    name: Option<String>,
    folder_type: crate::folder::FolderType,
) -> anyhow::Result<i32> {
    // Catch typos before involving the agent or the network.
    let parsed = InviteCode::decode(code)?;
    if parsed.is_expired(now_secs() as u64) {
        anyhow::bail!("this invite code has expired; ask for a new one");
    }
    let into = into
        .map(|p| std::path::absolute(&p).with_context(|| format!("bad path {}", p.display())))
        .transpose()?;
    let v = call(
        home.root(),
        &Request::Join {
            code: code.to_owned(),
            into,
            name,
            folder_type: Some(folder_type.as_str().to_owned()),
        },
        SLOW,
    )?;
    println!(
        "Paired with {} ({})",
        v["name"].as_str().unwrap_or("?"),
        v["device"].as_str().unwrap_or("?")
    );
    match (&v["folder"], v["folder_path"].as_str()) {
        (Value::Null, _) => {}
        (f, Some(path)) => println!(
            "Sharing folder {} ({}) at {path}",
            f["id"].as_str().unwrap_or("?"),
            f["label"].as_str().unwrap_or("?")
        ),
        (f, None) => println!(
            "The invite shares folder {} ({}): take it with `ferry folder accept` (see `ferry status`)",
            f["id"].as_str().unwrap_or("?"),
            f["label"].as_str().unwrap_or("?")
        ),
    }
    if v["folder_path"].is_string()
        && let Some(id) = v["folder"]["id"].as_str()
        && std::io::stdout().is_terminal()
    {
        initial_sync_progress(home, id);
    }
    Ok(super::EXIT_OK)
}

/// Draws the first sync of a joined folder as a progress bar, until it is
/// complete (Ctrl-C leaves it to the agent).
fn initial_sync_progress(home: &Home, folder: &str) {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("syncing {folder}"));
    let started = std::time::Instant::now();
    let mut seen_need = false;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(st) = control::call(home.root(), &Request::Status, QUICK) else {
            break;
        };
        let f = &st["folders"][folder];
        let need_items = f["need_items"].as_u64().unwrap_or(0);
        let need_bytes = f["need_bytes"].as_u64().unwrap_or(0);
        let have = home
            .index()
            .ok()
            .and_then(|i| {
                let fid = crate::folder::FolderId::new(folder).ok()?;
                let row = i.folder(&fid).ok()??.row;
                i.folder_stats(row).ok()
            })
            .map_or(0, |s| s.bytes);
        bar.set_length(have + need_bytes);
        bar.set_position(have);
        bar.set_message(format!("{need_items} items to go"));
        seen_need |= need_items > 0;
        if need_items == 0 && (seen_need || started.elapsed() > Duration::from_secs(5)) {
            break;
        }
    }
    bar.finish_with_message("in sync");
}

pub(super) fn devices(home: &Home, json: bool) -> anyhow::Result<i32> {
    let v = call(home.root(), &Request::Devices, QUICK)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(super::EXIT_OK);
    }
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("No paired devices: pair one with `ferry invite` and `ferry join`.");
        return Ok(super::EXIT_OK);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            let connected = d["connected"].as_bool().unwrap_or(false);
            vec![
                d["name"].as_str().unwrap_or("?").to_owned(),
                if connected { "connected" } else { "offline" }.to_owned(),
                match d["direct"].as_bool() {
                    Some(true) => "direct",
                    Some(false) => "relayed",
                    None => "-",
                }
                .to_owned(),
                d["address"].as_str().unwrap_or("-").to_owned(),
                d["last_seen_at"]
                    .as_i64()
                    .map(output::time)
                    .unwrap_or_else(|| "never".into()),
                output::bytes(d["bytes_in"].as_u64().unwrap_or(0)),
                output::bytes(d["bytes_out"].as_u64().unwrap_or(0)),
                d["id"].as_str().unwrap_or("?").to_owned(),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME",
            "STATE",
            "PATH",
            "ADDRESS",
            "LAST SEEN (UTC)",
            "IN",
            "OUT",
            "ID",
        ],
        &rows,
    );
    for d in &list {
        if let Some(e) = d["last_error"].as_str() {
            println!(
                "{}: last attempt failed: {e}",
                d["name"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(super::EXIT_OK)
}

pub(super) fn device(home: &Home, cmd: DeviceCommand) -> anyhow::Result<i32> {
    match cmd {
        DeviceCommand::Remove { id } => {
            call(
                home.root(),
                &Request::RemoveDevice { id: id.clone() },
                QUICK,
            )?;
            println!("Removed device {id}; its links are refused from now on.");
        }
    }
    Ok(super::EXIT_OK)
}

pub(super) fn share(
    home: &Home,
    folder: &str,
    device: &str,
    encrypted: bool,
) -> anyhow::Result<i32> {
    call(
        home.root(),
        &Request::Share {
            folder: folder.to_owned(),
            device: device.to_owned(),
            encrypted,
        },
        QUICK,
    )?;
    if encrypted {
        println!(
            "Offered folder {folder} to {device} to hold encrypted; once it accepts (`ferry folder accept` there), it is sent there sealed."
        );
        println!(
            "Keep the folder's recovery code (`ferry folder key {folder}`) somewhere safe: without it the backup cannot be opened."
        );
    } else {
        println!("Offered folder {folder} to {device}; it appears in `ferry status` there.");
    }
    Ok(super::EXIT_OK)
}

/// `ferry recover`: pairs with the holder first when given an invite code.
pub(super) fn recover(
    home: &Home,
    from: &str,
    key: &str,
    into: &Path,
    at: Option<i64>,
) -> anyhow::Result<i32> {
    let into = std::path::absolute(into)?;
    let holder = if crate::pairing::code::InviteCode::decode(from).is_ok() {
        let v = call(
            home.root(),
            &Request::Join {
                code: from.to_owned(),
                into: None,
                name: None,
                folder_type: None,
            },
            SLOW,
        )?;
        v["device"].as_str().unwrap_or_default().to_owned()
    } else {
        from.to_owned()
    };
    let follow = output::follow(
        home.root(),
        "recover",
        format!("recovering from {holder}"),
        false,
    );
    let v = call(
        home.root(),
        &Request::Recover {
            from: holder,
            key: key.to_owned(),
            into,
            at,
        },
        RECOVER,
    );
    drop(follow);
    let v = v?;
    println!(
        "Recovered folder {} ({}) into {}: {} files, {} bytes, from holder {}.",
        v["folder"].as_str().unwrap_or_default(),
        v["label"].as_str().unwrap_or_default(),
        v["path"].as_str().unwrap_or_default(),
        v["files"],
        v["bytes"],
        v["holder"].as_str().unwrap_or_default(),
    );
    println!("It is an ordinary folder of this device now, and the holder goes on holding it.");
    Ok(super::EXIT_OK)
}

/// The agent's status, or `None` when it is not running.
pub(super) fn agent_status(home: &Home) -> Option<Value> {
    control::call(home.root(), &Request::Status, Duration::from_secs(3)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_takes_half_the_cores_for_async_work_unless_told() {
        let got: Vec<usize> = [1, 2, 3, 4, 16]
            .map(|cores| async_workers(None, cores).unwrap())
            .to_vec();
        assert_eq!(got, [1, 1, 1, 2, 8]);
        assert_eq!(async_workers(Some("3"), 2), Ok(3));
        for bad in ["0", "-1", "two", "", "5000"] {
            let e = async_workers(Some(bad), 4).unwrap_err();
            assert!(
                e.contains("FERRY_ASYNC_THREADS") && e.contains("1 to 1024"),
                "{e}"
            );
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("2d"), Ok(172_800));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
