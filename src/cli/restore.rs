//! `ferry restore PATH [--version ID | --at TIME] [--to DEST] [--recursive]`:
//! puts an earlier version back. In place it goes through the agent, which
//! holds the folder's disk lock, keeps the version it replaces, and rescans so
//! the restore syncs; `--to` writes elsewhere without the agent.
//! `--version ID --from DEVICE` restores a version a connected peer keeps
//! (the agent fetches it, in place or `--to` DEST).
//!
//! `--json`: `{folder, path, to, restored: [{path, version, size, kept,
//! written_to}], unchanged: [PATH], left: [{path, reason}]}`, with `from:
//! {device, name}` when fetched from a peer.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use super::history::{Target, target};
use super::output;
use crate::daemon::control::{self, Request};
use crate::history::restore::{self, Dest, Outcome, Pick};
use crate::history::store::ChunkStore;
use crate::history::time::format_utc;
use crate::home::Home;
use crate::relpath::RelPath;

/// How long an in-place restore may take (a large tree is read and written).
const RESTORE_LIMIT: Duration = Duration::from_secs(3600);

/// What `ferry restore` was asked.
pub(super) struct RestoreArgs {
    pub(super) path: String,
    pub(super) version: Option<i64>,
    pub(super) at: Option<i64>,
    pub(super) to: Option<PathBuf>,
    pub(super) force: bool,
    pub(super) recursive: bool,
    pub(super) from: Option<String>,
    pub(super) json: bool,
}

/// Runs `ferry restore`.
pub(super) fn run(home: &Home, a: RestoreArgs) -> anyhow::Result<i32> {
    let index = home.index()?;
    let t = target(&index, &a.path)?;
    if let Some(device) = &a.from {
        return from_peer(home, &t, &a, device);
    }
    let pick = match (a.version, a.at) {
        (Some(v), _) => Pick::Version(v),
        (None, Some(at)) => Pick::At(at),
        (None, None) => Pick::Newest,
    };
    // Checked here first, so bad input fails before anything else happens.
    let plan = restore::plan(&index, &t.folder, t.path.as_ref(), pick, a.recursive)?;
    let outcome = match &a.to {
        Some(dest) => {
            let store = ChunkStore::open(&crate::history::store_dir(home.root()), &index)?;
            let dest = std::path::absolute(dest)?;
            let total = plan.items.iter().map(|i| i.source.size()).sum();
            let bar = output::byte_bar(total, "restoring", a.json);
            let done = |n: u64| {
                if let Some(b) = &bar {
                    b.inc(n);
                }
            };
            let outcome = restore::restore_to_with(
                &index,
                &store,
                &t.folder,
                plan,
                Dest {
                    path: &dest,
                    tree: a.recursive,
                    base: t.path.as_ref(),
                    force: a.force,
                },
                &done,
            );
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            outcome?
        }
        None if restore::changes_nothing(&index, &t.folder, &plan)? => Outcome {
            unchanged: plan.items.iter().map(|i| i.path.to_string()).collect(),
            left: plan
                .left
                .iter()
                .map(|(p, reason)| restore::LeftAlone {
                    path: p.to_string(),
                    reason: reason.clone(),
                })
                .collect(),
            ..Outcome::default()
        },
        None => {
            let total: u64 = plan.items.iter().map(|i| i.source.size()).sum();
            let follow = output::follow(
                home.root(),
                "restore",
                format!(
                    "the agent restores {} path{} ({}) in place",
                    plan.items.len(),
                    if plan.items.len() == 1 { "" } else { "s" },
                    output::bytes(total)
                ),
                a.json,
            );
            let v = control::call(
                home.root(),
                &Request::Restore {
                    folder: t.folder.id.to_string(),
                    path: t.path.as_ref().map(|p| p.as_str().to_owned()),
                    version: a.version,
                    at: a.at,
                    recursive: a.recursive,
                },
                RESTORE_LIMIT,
            );
            drop(follow);
            serde_json::from_value(v?)
                .map_err(|e| control::ControlError::BadAnswer(format!("restore result: {e}")))?
        }
    };
    if a.json {
        let v = json!({
            "folder": t.folder.id.as_str(),
            "path": t.path.as_ref().map(RelPath::as_str),
            "to": a.to,
            "restored": outcome.restored,
            "unchanged": outcome.unchanged,
            "left": outcome.left,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(super::EXIT_OK);
    }
    report(&t, &a, &outcome);
    Ok(super::EXIT_OK)
}

/// `--from DEVICE`: the agent fetches the version from that peer.
fn from_peer(home: &Home, t: &Target, a: &RestoreArgs, device: &str) -> anyhow::Result<i32> {
    let Some(path) = &t.path else {
        anyhow::bail!(
            "{} is a folder: give the file whose version to fetch",
            t.name()
        );
    };
    let version = a.version.context("--from needs --version ID")?;
    let to = a.to.as_deref().map(std::path::absolute).transpose()?;
    let v = control::call(
        home.root(),
        &Request::RestoreRemote {
            folder: t.folder.id.to_string(),
            path: path.as_str().to_owned(),
            device: device.to_owned(),
            version,
            to: to.clone(),
            force: a.force,
        },
        RESTORE_LIMIT,
    )?;
    let name = v["device_name"].as_str().unwrap_or(device).to_owned();
    let held_by = json!({ "device": v["device"], "name": name });
    let outcome: Outcome = serde_json::from_value(v)
        .map_err(|e| control::ControlError::BadAnswer(format!("restore result: {e}")))?;
    if a.json {
        let v = json!({
            "folder": t.folder.id.as_str(),
            "path": path.as_str(),
            "to": to,
            "from": held_by,
            "restored": outcome.restored,
            "unchanged": outcome.unchanged,
            "left": outcome.left,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(super::EXIT_OK);
    }
    match (outcome.restored.first(), &to) {
        (Some(r), Some(dest)) => println!(
            "Wrote version {version} of {} from {name} ({}) to {}.",
            t.name(),
            output::bytes(r.size),
            dest.display()
        ),
        (Some(r), None) => {
            println!(
                "Restored {} to version {version} from {name} ({}); it syncs to your other devices.",
                t.name(),
                output::bytes(r.size)
            );
            if let Some(k) = r.kept {
                println!("The version it replaced is kept as version {k}.");
            }
        }
        (None, _) => println!(
            "{} already holds version {version} from {name}: nothing to do.",
            t.name()
        ),
    }
    Ok(super::EXIT_OK)
}

fn report(t: &Target, a: &RestoreArgs, o: &Outcome) {
    let when = a.at.map(|at| format!(" as of {} UTC", format_utc(at)));
    if !a.recursive {
        match (o.restored.first(), &a.to) {
            (Some(r), Some(dest)) => println!(
                "Wrote {} of {}{} ({}) to {}.",
                r.version.map_or_else(
                    || "the current version".to_owned(),
                    |v| format!("version {v}")
                ),
                t.name(),
                when.unwrap_or_default(),
                output::bytes(r.size),
                dest.display()
            ),
            (Some(r), None) => {
                println!(
                    "Restored {} to version {} ({}); it syncs to your other devices.",
                    t.name(),
                    r.version.unwrap_or_default(),
                    output::bytes(r.size)
                );
                if let Some(k) = r.kept {
                    println!("The version it replaced is kept as version {k}.");
                }
            }
            (None, _) => println!(
                "{} already holds that version{}: nothing to do.",
                t.name(),
                when.unwrap_or_default()
            ),
        }
        return;
    }
    let bytes: u64 = o.restored.iter().map(|r| r.size).sum();
    match &a.to {
        Some(dest) => println!(
            "Wrote {} of {}{} ({}) to {}.",
            files(o.restored.len()),
            t.name(),
            when.unwrap_or_default(),
            output::bytes(bytes),
            dest.display()
        ),
        None => println!(
            "Restored {} of {}{} ({}); {} already were as then. The restore syncs to your other devices.",
            files(o.restored.len()),
            t.name(),
            when.unwrap_or_default(),
            output::bytes(bytes),
            o.unchanged.len()
        ),
    }
    if !o.left.is_empty() {
        println!("Left as they are:");
        let rows: Vec<Vec<String>> = o
            .left
            .iter()
            .map(|l| vec![l.path.clone(), l.reason.clone()])
            .collect();
        output::table(&["PATH", "WHY"], &rows);
    }
}

fn files(n: usize) -> String {
    if n == 1 {
        "1 file".to_owned()
    } else {
        format!("{n} files")
    }
}
