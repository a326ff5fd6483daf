//! `ferry history PATH`: the versions kept of a file; `ferry history prune`,
//! `verify` and `stats`. Also how a command names a path: on disk inside a
//! synced folder, or `FOLDER:PATH`.
//!
//! `--json` shapes (fields are only ever added):
//! - `history PATH`: `{folder, path, current: {path, kind, size, mtime_ns,
//!   permissions, hash, symlink_target, modified_by, device, deleted} | null,
//!   versions: [{id, path, kind, size, mtime_ns, permissions, hash,
//!   symlink_target, modified_by, device, superseded_at, reason, stored,
//!   device_holding, device_holding_name}], peer_versions: [the same without
//!   stored], peer_errors: [{device, name, error}], peers_truncated:
//!   [DEVICE-ID], peers_asked: BOOL}`, newest first (`path` is null for a
//!   whole folder; a directory lists the versions of every path below it).
//!   `versions` are this device's own (`device_holding` is its id);
//!   `peer_versions` those the connected peers keep, asked through the agent
//!   when it runs (`peers_asked`), restorable with `ferry restore PATH
//!   --version ID --from DEVICE`;
//! - `history prune`: `{versions, bytes, gc: {chunks_removed, packs_deleted,
//!   packs_rewritten, bytes_freed, damaged} | null, gc_busy}`;
//! - `history verify`: `{packs, chunks, bytes, pending, versions_affected,
//!   damage: [{what, problem}]}`;
//! - `history stats`: `{versions: {versions, bytes, pending, pending_bytes},
//!   store: {packs, chunks, chunk_bytes, pack_bytes}, folders: [{id, versions,
//!   bytes, pending, pending_bytes}]}`.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::output;
use crate::daemon::control;
use crate::folder::FolderId;
use crate::history::store::ChunkStore;
use crate::history::{self, prune, verify};
use crate::home::Home;
use crate::index::{FileKind, Folder, HistoryVersion, Index, LocalFile, now_secs};
use crate::relpath::RelPath;

/// `ferry history …`
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct HistoryArgs {
    /// Prune, verify or show totals.
    #[command(subcommand)]
    pub command: Option<HistoryCommand>,
    /// A file (or directory) in a synced folder: a path on disk, or
    /// FOLDER:PATH.
    #[arg(required = true)]
    pub path: Option<String>,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `ferry history prune|verify|stats`
#[derive(Debug, Subcommand)]
pub enum HistoryCommand {
    /// Apply the retention policy now (the agent does it daily), then free
    /// the space of chunks no version needs any more.
    Prune {
        /// Only this folder (default: all).
        folder: Option<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read back every chunk of the history store and every version still
    /// waiting to move into it; exit 1 if anything is damaged.
    Verify {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Versions kept and the store's size.
    Stats {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A path a command names: a folder, and a path in it (`None`: its root).
pub(super) struct Target {
    pub(super) folder: Folder,
    pub(super) path: Option<RelPath>,
}

impl Target {
    /// `FOLDER:PATH`, for messages.
    pub(super) fn name(&self) -> String {
        match &self.path {
            Some(p) => format!("{}:{p}", self.folder.id),
            None => format!("{}:", self.folder.id),
        }
    }
}

/// Resolves `arg`: `FOLDER:PATH` when FOLDER is a folder's id, else a path on
/// disk (it need not exist any more) inside a folder's root.
pub(super) fn target(index: &Index, arg: &str) -> anyhow::Result<Target> {
    if let Some((id, rest)) = arg.split_once(':')
        && let Ok(fid) = FolderId::new(id)
        && let Some(folder) = index.folder(&fid)?
    {
        let rest = rest.trim_matches('/');
        let path = if rest.is_empty() {
            None
        } else {
            Some(RelPath::new(rest)?)
        };
        return Ok(Target { folder, path });
    }
    let abs = resolve_on_disk(Path::new(arg))?;
    for folder in index.folders()? {
        if let Ok(rel) = abs.strip_prefix(&folder.path) {
            let path = if rel.as_os_str().is_empty() {
                None
            } else {
                Some(RelPath::from_fs(rel).with_context(|| arg.to_owned())?)
            };
            return Ok(Target { folder, path });
        }
    }
    anyhow::bail!(
        "{arg} is not inside a synced folder (see `ferry folder list`; or name it FOLDER:PATH)"
    )
}

/// An absolute path with `.` and `..` resolved and the longest part that
/// exists canonicalised (so symlinked parents resolve as folder roots do).
fn resolve_on_disk(p: &Path) -> anyhow::Result<PathBuf> {
    let abs = std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))?;
    let mut clean = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    let mut existing = clean.clone();
    let mut rest = Vec::new();
    while std::fs::symlink_metadata(&existing).is_err() {
        let Some(name) = existing.file_name() else {
            break;
        };
        rest.push(name.to_owned());
        existing.pop();
    }
    // The last component itself is not followed if it is a symlink.
    if let (Some(name), Some(parent)) = (
        existing.file_name().map(|n| n.to_owned()),
        existing.parent().map(Path::to_owned),
    ) && std::fs::symlink_metadata(&existing).is_ok_and(|m| m.file_type().is_symlink())
    {
        rest.push(name);
        existing = parent;
    }
    let mut out = std::fs::canonicalize(&existing).unwrap_or(existing);
    for name in rest.into_iter().rev() {
        out.push(name);
    }
    Ok(out)
}

fn device(short: crate::device::ShortId, name: Option<&str>) -> String {
    name.map(str::to_owned).unwrap_or_else(|| short.to_string())
}

fn version_json(v: &HistoryVersion, me: &str, my_name: &str) -> Value {
    json!({
        "id": v.id, "path": v.path.as_str(), "kind": v.kind, "size": v.size,
        "mtime_ns": v.mtime_ns, "permissions": format!("{:04o}", v.permissions),
        "hash": v.hash.map(|h| h.to_hex()), "symlink_target": v.symlink_target,
        "modified_by": v.modified_by.to_string(), "device": v.device,
        "superseded_at": v.superseded_at, "reason": v.reason, "stored": v.stored,
        "device_holding": me, "device_holding_name": my_name,
    })
}

/// What the connected peers keep of the target, through the agent (`None`
/// when it is not running).
fn peer_versions(home: &Home, t: &Target) -> Option<Value> {
    let req = control::Request::History {
        folder: t.folder.id.to_string(),
        path: t.path.as_ref().map(|p| p.as_str().to_owned()),
    };
    match control::call(home.root(), &req, Duration::from_secs(30)) {
        Ok(v) => Some(v),
        Err(control::ControlError::NotRunning(_)) => None,
        Err(e) => {
            eprintln!("warning: cannot list the versions your other devices keep: {e}");
            None
        }
    }
}

fn current_json(l: &LocalFile, device_name: Option<&str>) -> Value {
    let r = &l.record;
    json!({
        "path": r.path.as_str(), "kind": r.kind, "size": r.size, "mtime_ns": r.mtime_ns,
        "permissions": format!("{:04o}", r.permissions), "hash": r.hash.map(|h| h.to_hex()),
        "symlink_target": r.symlink_target, "modified_by": r.modified_by.to_string(),
        "device": device_name, "deleted": r.deleted,
    })
}

/// Runs `ferry history …`.
pub(super) fn run(home: &Home, args: HistoryArgs) -> anyhow::Result<i32> {
    match args.command {
        Some(HistoryCommand::Prune { folder, json }) => prune(home, folder.as_deref(), json),
        Some(HistoryCommand::Verify { json }) => verify(home, json),
        Some(HistoryCommand::Stats { json }) => stats(home, json),
        None => list(
            home,
            args.path.as_deref().context("give a PATH (see --help)")?,
            args.json,
        ),
    }
}

fn list(home: &Home, arg: &str, json: bool) -> anyhow::Result<i32> {
    let index = home.index()?;
    let t = target(&index, arg)?;
    let current = match &t.path {
        Some(p) => index.local_file(t.folder.row, p)?,
        None => None,
    };
    // A directory (or the folder root) lists every version below it.
    let below = t.path.is_none()
        || current
            .as_ref()
            .is_some_and(|c| c.record.kind == FileKind::Dir);
    let versions = index.history_of(t.folder.row, t.path.as_ref(), below)?;
    let current = current.filter(|c| !c.record.deleted && c.record.kind != FileKind::Dir);
    let peers = peer_versions(home, &t);
    let empty = Vec::new();
    let peer_list = peers
        .as_ref()
        .and_then(|p| p["versions"].as_array())
        .unwrap_or(&empty);
    let peer_errors = peers
        .as_ref()
        .and_then(|p| p["errors"].as_array())
        .unwrap_or(&empty);
    if versions.is_empty() && current.is_none() && peer_list.is_empty() && !below {
        anyhow::bail!(
            "nothing is known of {}: no versions kept, and not in the index",
            t.name()
        );
    }
    let current_device = match &current {
        Some(c) => index.device_name(c.record.modified_by)?,
        None => None,
    };
    let me = home.device_id().to_string();
    let my_name = home.config().device.name.clone();
    if json {
        let v = json!({
            "folder": t.folder.id.as_str(),
            "path": t.path.as_ref().map(RelPath::as_str),
            "current": current.as_ref().map(|c| current_json(c, current_device.as_deref())),
            "versions": versions.iter().map(|v| version_json(v, &me, &my_name)).collect::<Vec<_>>(),
            "peer_versions": peer_list,
            "peer_errors": peer_errors,
            "peers_truncated": peers.as_ref().map_or(Value::Array(Vec::new()), |p| p["truncated"].clone()),
            "peers_asked": peers.is_some(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(super::EXIT_OK);
    }
    let failed = || {
        for e in peer_errors {
            println!(
                "Could not ask {}: {}",
                e["name"].as_str().unwrap_or("a device"),
                e["error"].as_str().unwrap_or("unknown error")
            );
        }
    };
    if versions.is_empty() && current.is_none() && peer_list.is_empty() {
        println!("No versions of {} are kept.", t.name());
        failed();
        return Ok(super::EXIT_OK);
    }
    let short_hash = |h: Option<crate::chunking::FileHash>| {
        h.map(|h| h.to_hex()[..16].to_owned())
            .unwrap_or_else(|| "-".into())
    };
    let size = |kind: FileKind, n: u64, target: Option<&str>| match kind {
        FileKind::Symlink => format!("-> {}", target.unwrap_or("")),
        _ => output::bytes(n),
    };
    let mut rows = Vec::new();
    if let Some(c) = &current {
        let r = &c.record;
        let mut row = vec![
            "current".to_owned(),
            "-".to_owned(),
            output::time(r.mtime_ns.div_euclid(1_000_000_000)),
            size(r.kind, r.size, r.symlink_target.as_deref()),
            device(r.modified_by, current_device.as_deref()),
            "-".to_owned(),
            short_hash(r.hash),
            "this device".to_owned(),
        ];
        if below {
            row.push(r.path.to_string());
        }
        rows.push(row);
    }
    // This device's versions and the peers', newest first.
    let mut listed: Vec<(i64, Vec<String>)> = Vec::new();
    for v in &versions {
        let mut row = vec![
            v.id.to_string(),
            output::time(v.superseded_at),
            output::time(v.mtime_ns.div_euclid(1_000_000_000)),
            size(v.kind, v.size, v.symlink_target.as_deref()),
            device(v.modified_by, v.device.as_deref()),
            v.reason.as_str().to_owned(),
            short_hash(v.hash),
            "this device".to_owned(),
        ];
        if below {
            row.push(v.path.to_string());
        }
        listed.push((v.superseded_at, row));
    }
    for v in peer_list {
        let text = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
        let kind = match v["kind"].as_str() {
            Some("symlink") => FileKind::Symlink,
            Some("dir") => FileKind::Dir,
            _ => FileKind::File,
        };
        let superseded = v["superseded_at"].as_i64().unwrap_or(0);
        let mut row = vec![
            v["id"].as_i64().unwrap_or(0).to_string(),
            output::time(superseded),
            output::time(
                v["mtime_ns"]
                    .as_i64()
                    .unwrap_or(0)
                    .div_euclid(1_000_000_000),
            ),
            size(
                kind,
                v["size"].as_u64().unwrap_or(0),
                v["symlink_target"].as_str(),
            ),
            v["device"]
                .as_str()
                .map_or_else(|| text("modified_by"), str::to_owned),
            text("reason"),
            v["hash"]
                .as_str()
                .map_or_else(|| "-".to_owned(), |h| h.chars().take(16).collect()),
            text("device_holding_name"),
        ];
        if below {
            row.push(text("path"));
        }
        listed.push((superseded, row));
    }
    // Stable: equal times keep this device's first.
    listed.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    rows.extend(listed.into_iter().map(|(_, r)| r));
    let mut header = vec![
        "VERSION",
        "SUPERSEDED (UTC)",
        "MODIFIED (UTC)",
        "SIZE",
        "DEVICE",
        "REASON",
        "HASH",
        "HELD BY",
    ];
    if below {
        header.push("PATH");
    }
    println!("{}", t.name());
    output::table(&header, &rows);
    if !peer_list.is_empty() {
        println!(
            "A version held by another device is restored with `ferry restore PATH --version ID --from DEVICE`."
        );
    }
    failed();
    Ok(super::EXIT_OK)
}

fn open_store(home: &Home, index: &Index) -> anyhow::Result<ChunkStore> {
    Ok(ChunkStore::open(&history::store_dir(home.root()), index)?)
}

fn prune(home: &Home, only: Option<&str>, json: bool) -> anyhow::Result<i32> {
    let folders: Vec<_> = super::scan::selected(home, only)?
        .into_iter()
        .map(|f| {
            let p = home.config().history_policy(&f.id);
            (f, p)
        })
        .collect();
    let mut index = home.index()?;
    let store = open_store(home, &index)?;
    let r = prune::prune(&mut index, &store, &folders, now_secs())?;
    if json {
        let gc = r.gc.as_ref().map(|g| {
            json!({
                "chunks_removed": g.chunks_removed, "packs_deleted": g.packs_deleted,
                "packs_rewritten": g.packs_rewritten, "bytes_freed": g.bytes_freed,
                "damaged": g.damaged.len(),
            })
        });
        let v = json!({
            "versions": r.versions, "bytes": r.bytes, "gc": gc, "gc_busy": r.gc_busy,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(super::EXIT_OK);
    }
    println!(
        "Pruned {} versions ({}).",
        r.versions,
        output::bytes(r.bytes)
    );
    match (&r.gc, r.gc_busy) {
        (Some(g), _) => {
            println!(
                "Freed {} in the history store ({} chunks dropped, {} packs deleted, {} rewritten).",
                output::bytes(g.bytes_freed),
                g.chunks_removed,
                g.packs_deleted,
                g.packs_rewritten
            );
            if !g.damaged.is_empty() {
                println!(
                    "{} damaged chunks were left in place: run `ferry history verify`.",
                    g.damaged.len()
                );
            }
        }
        (None, true) => println!(
            "The history store is in use (the agent is writing to it): its space is freed at the next prune."
        ),
        (None, false) => {}
    }
    Ok(super::EXIT_OK)
}

fn verify(home: &Home, json: bool) -> anyhow::Result<i32> {
    let index = home.index()?;
    let store = open_store(home, &index)?;
    let check = verify::verify(&index, &store)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&check)?);
    } else {
        println!(
            "Checked {} packs, {} chunks ({}), and {} versions waiting to be stored.",
            check.packs,
            check.chunks,
            output::bytes(check.bytes),
            check.pending
        );
        if !check.damage.is_empty() {
            let rows: Vec<Vec<String>> = check
                .damage
                .iter()
                .map(|d| vec![d.what.clone(), d.problem.clone()])
                .collect();
            output::table(&["DAMAGED", "PROBLEM"], &rows);
        }
    }
    if !check.is_ok() {
        anyhow::bail!(
            "the history is damaged: {} problems, {} versions cannot be restored intact",
            check.damage.len(),
            check.versions_affected
        );
    }
    if !json {
        println!("No damage found.");
    }
    Ok(super::EXIT_OK)
}

fn stats(home: &Home, json: bool) -> anyhow::Result<i32> {
    let index = home.index()?;
    let store = index.store_totals()?;
    let all = index.history_totals(None)?;
    let mut per_folder = Vec::new();
    for f in index.folders()? {
        per_folder.push((f.id.clone(), index.history_totals(Some(f.row))?));
    }
    if json {
        let v = json!({
            "versions": all,
            "store": {
                "packs": store.packs, "chunks": store.chunks,
                "chunk_bytes": store.chunk_bytes, "pack_bytes": store.pack_bytes,
            },
            "folders": per_folder.iter().map(|(id, t)| {
                let mut v = serde_json::to_value(t).expect("totals serialize");
                v["id"] = json!(id.as_str());
                v
            }).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(super::EXIT_OK);
    }
    let rows: Vec<Vec<String>> = per_folder
        .iter()
        .map(|(id, t)| {
            vec![
                id.to_string(),
                t.versions.to_string(),
                output::bytes(t.bytes),
                t.pending.to_string(),
            ]
        })
        .collect();
    output::table(&["FOLDER", "VERSIONS", "THEIR SIZE", "PENDING"], &rows);
    println!(
        "History store: {} in {} packs ({} chunks, {} of data); {} versions of {} in all.",
        output::bytes(store.pack_bytes),
        store.packs,
        store.chunks,
        output::bytes(store.chunk_bytes),
        all.versions,
        output::bytes(all.bytes)
    );
    Ok(super::EXIT_OK)
}
