//! `ferry status`: every folder's state and totals.

use std::time::Duration;

use serde_json::{Value, json};

use crate::daemon::control::{self, Request};

use super::{folder::state, output};
use crate::home::Home;

pub(super) fn run(home: &Home, json: bool) -> anyhow::Result<i32> {
    let index = home.index()?;
    let folders = index.folders()?;
    let mut entries = Vec::new();
    let mut peers_of = Vec::new();
    let mut holders_of = Vec::new();
    for f in &folders {
        let stats = index.folder_stats(f.row)?;
        let (state, error) = state(f);
        entries.push((f, stats, state, error));
        peers_of.push(index.peer_completion(f.row)?);
        holders_of.push(index.vault_holders(f.row)?);
    }
    let vaults = index.vaults()?;
    let names: std::collections::HashMap<String, String> = index
        .peers()?
        .into_iter()
        .map(|p| (p.id.to_string(), p.name))
        .collect();
    let name_of =
        |d: &crate::device::DeviceId| names.get(&d.to_string()).cloned().unwrap_or_default();
    let agent = super::agent::agent_status(home);
    let offers = index.offers()?;
    if json {
        let peers = agent.as_ref().and_then(|_| {
            control::call(home.root(), &Request::Devices, Duration::from_secs(10)).ok()
        });
        let v = json!({
            "device": { "id": home.device_id().to_string(), "name": home.config().device.name },
            "agent": agent,
            "offers": offers,
            "peers": peers,
            "vaults": vaults.iter().map(|v| json!({
                "folder": v.folder_id, "label": v.label, "encrypted": true,
                "owner": v.owner.to_string(), "owner_name": name_of(&v.owner),
                "records": v.records, "chunks": v.chunks,
                "bytes": v.chunk_bytes + v.record_bytes,
            })).collect::<Vec<_>>(),
            "folders": entries.iter().zip(&peers_of).zip(&holders_of).map(|(((f, s, state, error), peers), holders)| {
                let live = live(&agent, f.id.as_str());
                json!({
                    "id": f.id.as_str(), "label": f.label, "path": f.path,
                    "type": f.folder_type.as_str(),
                    "state": live.state.unwrap_or(state), "error": live.error.or(error.clone()),
                    "files": s.files, "dirs": s.dirs, "symlinks": s.symlinks, "bytes": s.bytes,
                    "deleted": s.deleted, "sequence": f.sequence, "last_scan_at": f.last_scan_at,
                    "held_deletes": f.held_deletes,
                    "need_items": live.need_items, "need_bytes": live.need_bytes,
                    "notice": live.notice,
                    "global_bytes": s.bytes + live.need_bytes,
                    "completion": completion(s.bytes, live.need_bytes, live.need_items),
                    "peers": peers.iter().map(|p| json!({
                        "device": p.device, "name": p.name, "completion": p.completion(),
                        "need_items": p.need_items, "need_bytes": p.need_bytes,
                    })).collect::<Vec<_>>(),
                    "holders": holders.iter().map(|(d, h)| json!({
                        "device": d.to_string(), "name": name_of(d),
                        "sent_sequence": h.pushed, "up_to_date": h.pushed >= f.sequence,
                    })).collect::<Vec<_>>(),
                })
            }).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(super::EXIT_OK);
    }
    println!(
        "Device {} ({})",
        home.config().device.name,
        home.device_id()
    );
    match &agent {
        Some(a) => println!(
            "Agent running (pid {}), {} links from unknown devices refused",
            a["pid"], a["refused_links"]
        ),
        None => println!("Agent not running (start it with `ferry daemon`)"),
    }
    for o in &offers {
        if o.encrypted {
            println!(
                "Offer {}: {} asks this device to hold folder {} ({}) encrypted; take it with `ferry folder accept {}`",
                o.id, o.device_name, o.folder_id, o.label, o.id
            );
        } else {
            println!(
                "Offer {}: {} offers folder {} ({}); take it with `ferry folder accept {} --into PATH`",
                o.id, o.device_name, o.folder_id, o.label, o.id
            );
        }
    }
    for v in &vaults {
        println!(
            "Holding folder {} ({}) encrypted for {} ({}): {} records, {} chunks, {} (unreadable here)",
            v.folder_id,
            v.label,
            name_of(&v.owner),
            &v.owner.to_string()[..12],
            v.records,
            v.chunks,
            output::bytes(v.chunk_bytes + v.record_bytes)
        );
    }
    if folders.is_empty() {
        if !vaults.is_empty() {
            return Ok(super::EXIT_OK);
        }
        println!("No folders yet: add one with `ferry folder add PATH`.");
        return Ok(super::EXIT_OK);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|(f, s, state, _)| {
            let live = live(&agent, f.id.as_str());
            vec![
                f.id.to_string(),
                live.state.unwrap_or(state).to_string(),
                format!(
                    "{:.0}%",
                    completion(s.bytes, live.need_bytes, live.need_items)
                ),
                if live.need_items > 0 {
                    format!("{} ({})", live.need_items, output::bytes(live.need_bytes))
                } else {
                    "-".into()
                },
                s.files.to_string(),
                s.dirs.to_string(),
                output::bytes(s.bytes),
                f.last_scan_at
                    .map(output::time)
                    .unwrap_or_else(|| "never".into()),
                f.path.display().to_string(),
            ]
        })
        .collect();
    output::table(
        &[
            "FOLDER",
            "STATE",
            "SYNCED",
            "NEEDED",
            "FILES",
            "DIRS",
            "SIZE",
            "LAST SCAN (UTC)",
            "PATH",
        ],
        &rows,
    );
    for (((f, _, _, error), peers), holders) in entries.iter().zip(&peers_of).zip(&holders_of) {
        let live = live(&agent, f.id.as_str());
        for (d, h) in holders {
            let short = &d.to_string()[..12];
            if h.pushed >= f.sequence {
                println!(
                    "{}: {} ({short}) holds it encrypted, up to date",
                    f.id,
                    name_of(d)
                );
            } else {
                println!(
                    "{}: {} ({short}) holds it encrypted; changes after #{} still to send",
                    f.id,
                    name_of(d),
                    h.pushed
                );
            }
        }
        for p in peers {
            let short = &p.device[..p.device.len().min(12)];
            if p.need_items == 0 {
                println!("{}: {} ({short}) has all of it", f.id, p.name);
            } else {
                println!(
                    "{}: {} ({short}) is at {:.0}%, {} items ({}) to go",
                    f.id,
                    p.name,
                    p.completion(),
                    p.need_items,
                    output::bytes(p.need_bytes)
                );
            }
        }
        if let Some(e) = live.error.or(error.clone()) {
            println!("{}: {e}", f.id);
        }
        if let Some(n) = live.notice {
            println!("{}: {n}", f.id);
        }
        if f.held_deletes > 0 {
            println!(
                "{}: {} deletes held back: the last scan found more than {}% of the folder gone at once. \
                 If that is intended, run `ferry folder confirm-deletes {}`; if a disk is unmounted, mount it.",
                f.id,
                f.held_deletes,
                home.config().scan.hold_deletes_percent,
                f.id
            );
        }
        if live.need_items > 0 {
            println!(
                "{}: {} items not in sync; `ferry status --need {}` says why",
                f.id, live.need_items, f.id
            );
        }
    }
    if agent.is_some()
        && let Ok(v) = control::call(home.root(), &Request::Devices, Duration::from_secs(10))
    {
        for d in v.as_array().into_iter().flatten() {
            println!(
                "Peer {}: {}, chunks in {} / out {}",
                d["name"].as_str().unwrap_or("?"),
                if d["connected"].as_bool().unwrap_or(false) {
                    "connected"
                } else {
                    "offline"
                },
                output::bytes(d["chunk_bytes_in"].as_u64().unwrap_or(0)),
                output::bytes(d["chunk_bytes_out"].as_u64().unwrap_or(0)),
            );
        }
    }
    Ok(super::EXIT_OK)
}

/// `ferry status --watch`: the status (or `--need FOLDER`) again every
/// `interval`. On a terminal the screen is redrawn; otherwise each refresh is
/// a new block (a JSON document per refresh with `--json`), headed by a line
/// with the time unless it is JSON. Runs until interrupted, or until stdout is
/// closed (the write then raises SIGPIPE, which ends ferry quietly).
pub(super) fn watch(
    home: &Home,
    need_of: Option<&str>,
    json: bool,
    interval: Duration,
) -> anyhow::Result<i32> {
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stdout().is_terminal() && !json;
    loop {
        if terminal {
            // Home the cursor and clear the screen, then draw afresh.
            print!("\x1b[H\x1b[2J");
        } else if !json {
            println!("--- {} UTC ---", output::time(crate::index::now_secs()));
        }
        let result = match need_of {
            Some(folder) => need(home, folder, json),
            None => run(home, json),
        };
        if let Err(e) = result {
            // The agent may stop or start meanwhile: say so, keep watching.
            if json {
                println!("{}", json!({ "error": super::one_line(&e) }));
            } else {
                println!("{}", super::one_line(&e));
            }
        }
        if !terminal {
            println!();
        }
        std::io::stdout().flush()?;
        std::thread::sleep(interval);
    }
}

/// What the running agent says of a folder.
#[derive(Default)]
struct Live {
    state: Option<&'static str>,
    error: Option<String>,
    need_items: u64,
    need_bytes: u64,
    notice: Option<String>,
}

fn live(agent: &Option<Value>, folder: &str) -> Live {
    let Some(f) = agent.as_ref().map(|a| &a["folders"][folder]) else {
        return Live::default();
    };
    if f.is_null() {
        return Live::default();
    }
    Live {
        state: match f["state"].as_str() {
            Some("idle") => Some("idle"),
            Some("scanning") => Some("scanning"),
            Some("syncing") => Some("syncing"),
            Some("error") => Some("error"),
            _ => None,
        },
        error: f["error"].as_str().map(str::to_owned),
        need_items: f["need_items"].as_u64().unwrap_or(0),
        need_bytes: f["need_bytes"].as_u64().unwrap_or(0),
        notice: f["notice"].as_str().map(str::to_owned),
    }
}

fn completion(have: u64, need_bytes: u64, need_items: u64) -> f64 {
    if need_items == 0 {
        return 100.0;
    }
    let global = have + need_bytes;
    if global == 0 {
        return 0.0;
    }
    // Never show 100% while something is still needed.
    (100.0 * have as f64 / global as f64).min(99.0)
}

/// `ferry status --need FOLDER`: every item not in sync, and why.
pub(super) fn need(home: &Home, folder: &str, json: bool) -> anyhow::Result<i32> {
    let v = control::call(home.root(), &Request::Status, Duration::from_secs(10))?;
    let f = &v["folders"][folder];
    if f.is_null() {
        return Err(crate::folder::FolderError::Unknown(folder.to_owned()).into());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(f)?);
        return Ok(super::EXIT_OK);
    }
    let items = f["need"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("{folder}: everything is in sync.");
        return Ok(super::EXIT_OK);
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                i["path"].as_str().unwrap_or("?").to_owned(),
                output::bytes(i["size"].as_u64().unwrap_or(0)),
                i["reason"].as_str().unwrap_or("?").to_owned(),
            ]
        })
        .collect();
    output::table(&["PATH", "SIZE", "WHY"], &rows);
    let total = f["need_items"].as_u64().unwrap_or(0);
    if total > items.len() as u64 {
        println!("… and {} more", total - items.len() as u64);
    }
    Ok(super::EXIT_OK)
}
