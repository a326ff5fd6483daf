//! The agent's side of the history: one background task (`history`) that moves
//! the versions pulls set aside into the chunk store shortly after each pull
//! (and at start), captures local versions for folders that keep them, and
//! applies the retention policy daily; and the control requests that change
//! a folder's files (restore in place, resolve a conflict, restore a version
//! a peer keeps), which run under the folder's disk lock and are followed by
//! a scan, so they sync as local changes; and listing the versions connected
//! peers keep.
//!
//! The task uses an index connection of its own, so the agent's shared index
//! is never held while files are read and packs written.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::path::PathBuf;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::chunking::FileHash;
use crate::device::{DeviceId, ShortId};
use crate::folder::{check_root, temp_dir};
use crate::history::restore::{self, Pick};
use crate::history::store::ChunkStore;
use crate::history::{HistoryError, ingest, local, prune, resolve};
use crate::home::Home;
use crate::index::{FileKind, Index, now_secs};
use crate::relpath::RelPath;
use crate::sync::Engine;

/// How often the task looks for work when nothing wakes it.
const TICK: Duration = Duration::from_secs(5);
/// After a local change, how long to let a burst of them settle.
const SETTLE: Duration = Duration::from_millis(300);
/// The first pass after the agent starts.
const FIRST_PASS: Duration = Duration::from_secs(1);
/// The first prune after the agent starts, then the interval between prunes.
const FIRST_PRUNE: Duration = Duration::from_secs(10 * 60);
const PRUNE_EVERY: Duration = Duration::from_secs(24 * 3600);
/// When GC found the store busy, try again after this long.
const PRUNE_RETRY: Duration = Duration::from_secs(3600);

/// What the task keeps between passes.
struct State {
    index: Option<Index>,
    /// Versions not to try again in this run.
    skip: HashSet<i64>,
    /// Per local-history folder, the sequence captured up to.
    captured: HashMap<i64, i64>,
    swept: bool,
    next_prune: Instant,
}

/// Runs the history task until `shutdown`.
pub(super) async fn run(
    home: Home,
    store: ChunkStore,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
) {
    let mut changes = Some(engine.watch_local_changes());
    let state = Arc::new(Mutex::new(State {
        index: None,
        skip: HashSet::new(),
        captured: HashMap::new(),
        swept: false,
        next_prune: Instant::now() + FIRST_PRUNE,
    }));
    let mut wait = FIRST_PASS;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            changed = async {
                match changes.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if changed.is_err() {
                    changes = None;
                    continue;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(SETTLE) => {}
                }
            }
        }
        wait = TICK;
        let (home, store, engine, state, stop) = (
            home.clone(),
            store.clone(),
            engine.clone(),
            state.clone(),
            shutdown.clone(),
        );
        let done = tokio::task::spawn_blocking(move || {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            pass(&home, &store, &engine, &mut st, &stop)
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("history: {e}"),
            Err(e) => tracing::error!("the history task failed: {e}"),
        }
    }
}

/// One pass: leftovers of a crash, pending versions, local captures, and the
/// prune when it is due.
fn pass(
    home: &Home,
    store: &ChunkStore,
    engine: &Engine,
    st: &mut State,
    stop: &CancellationToken,
) -> Result<(), String> {
    if st.index.is_none() {
        st.index = Some(home.index().map_err(|e| e.to_string())?);
    }
    let index = st.index.as_mut().expect("opened above");
    // The config may have been reloaded since the last pass.
    index.set_local_history(home.config().local_history());
    let stopped = || stop.is_cancelled();
    if !st.swept {
        for f in index.folders().map_err(|e| e.to_string())? {
            if check_root(&f).is_ok() {
                match ingest::sweep(index, &f.path) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(folder = %f.id, files = n, "removed versions already in the history store")
                    }
                    Err(e) => tracing::warn!(folder = %f.id, "{e}"),
                }
                // Restores run under the disk lock: none is half-way now.
                if let Some(h) = engine.folder(f.id.as_str()) {
                    let _disk = h.disk.blocking_lock();
                    if let Err(e) = restore::sweep_temp(&f.path) {
                        tracing::warn!(folder = %f.id, "{e}");
                    }
                }
            }
        }
        st.swept = true;
    }
    let r =
        ingest::ingest_pending(index, store, &mut st.skip, &stopped).map_err(|e| e.to_string())?;
    if r.versions > 0 {
        tracing::info!(
            versions = r.versions,
            bytes = r.bytes,
            new_bytes = r.bytes_written,
            "moved versions into the history store"
        );
    }
    let local: HashSet<i64> = index
        .local_history_folders()
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    if !local.is_empty() {
        for f in index.folders().map_err(|e| e.to_string())? {
            if !local.contains(&f.row) || check_root(&f).is_err() || stopped() {
                continue;
            }
            let after = st.captured.get(&f.row).copied().unwrap_or(0);
            let (next, r) =
                local::capture(index, store, &f, after, &stopped).map_err(|e| e.to_string())?;
            st.captured.insert(f.row, next);
            if r.files > 0 {
                tracing::debug!(folder = %f.id, files = r.files, new_bytes = r.bytes_written, "captured local versions");
            }
        }
    }
    if Instant::now() >= st.next_prune && !stopped() {
        let folders: Vec<_> = index
            .folders()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|f| {
                let p = home.config().history_policy(&f.id);
                (f, p)
            })
            .collect();
        let r = prune::prune(index, store, &folders, now_secs()).map_err(|e| e.to_string())?;
        st.next_prune = Instant::now() + if r.gc_busy { PRUNE_RETRY } else { PRUNE_EVERY };
        if r.versions > 0 {
            // Backup holders drop what was pruned at their next round.
            engine.local_changed();
        }
        tracing::info!(
            versions = r.versions,
            bytes = r.bytes,
            freed = r.gc.as_ref().map_or(0, |g| g.bytes_freed),
            "applied the history retention policy"
        );
    }
    Ok(())
}

/// Runs `f` on a blocking thread with a fresh index connection.
async fn with_index<R: Send + 'static>(
    home: &Home,
    f: impl FnOnce(&mut Index) -> Result<R, HistoryError> + Send + 'static,
) -> Result<R, String> {
    let home = home.clone();
    tokio::task::spawn_blocking(move || {
        let mut index = home.index().map_err(|e| e.to_string())?;
        f(&mut index).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("the restore task failed: {e}"))?
}

/// What the control requests need of the agent.
pub(super) struct Ctx<'a> {
    pub(super) home: &'a Home,
    pub(super) store: &'a ChunkStore,
    pub(super) engine: &'a Arc<Engine>,
    pub(super) operations: &'a crate::progress::Operations,
}

/// `restore`: restores in place under the folder's disk lock, scanning
/// before (so the index matches the disk) and after (so the restore syncs).
pub(super) async fn restore(
    Ctx {
        home,
        store,
        engine,
        operations,
    }: Ctx<'_>,
    folder: String,
    path: Option<String>,
    version: Option<i64>,
    at: Option<i64>,
    recursive: bool,
) -> Result<Value, String> {
    let h = engine
        .folder(&folder)
        .ok_or_else(|| crate::folder::FolderError::Unknown(folder.clone()).to_string())?;
    let rel = path
        .map(|p| RelPath::new(&p))
        .transpose()
        .map_err(|e| e.to_string())?;
    let pick = match (version, at) {
        (None, None) => Pick::Newest,
        (Some(v), None) => Pick::Version(v),
        (None, Some(t)) => Pick::At(t),
        (Some(_), Some(_)) => return Err("give a version or a time, not both".into()),
    };
    engine
        .scan_folder(&h, false)
        .await
        .ok_or_else(|| format!("the scan of {folder} failed; see `ferry status`"))?;
    let running = operations.start("restore", &folder);
    let outcome = {
        let _disk = h.disk.lock().await;
        let f = h.folder();
        let store = store.clone();
        let progress = running.shared();
        with_index(home, move |index| {
            let plan = restore::plan(index, &f, rel.as_ref(), pick, recursive)?;
            progress.set_total(plan.items.iter().map(|i| i.source.size()).sum());
            restore::restore_in_place(index, &store, &f, plan, &|n| progress.add(n))
        })
        .await
    };
    drop(running);
    if outcome.as_ref().is_ok_and(|o| !o.restored.is_empty()) {
        engine.scan_folder(&h, false).await;
    }
    Ok(serde_json::to_value(outcome?).expect("outcomes serialize"))
}

/// `resolve`: resolves the newest open conflict of a path under the folder's
/// disk lock, scanning before and after.
pub(super) async fn resolve(
    Ctx {
        home,
        store,
        engine,
        ..
    }: Ctx<'_>,
    folder: String,
    path: String,
    keep: String,
) -> Result<Value, String> {
    let h = engine
        .folder(&folder)
        .ok_or_else(|| crate::folder::FolderError::Unknown(folder.clone()).to_string())?;
    let rel = RelPath::new(&path).map_err(|e| e.to_string())?;
    let keep: resolve::Keep = keep.parse()?;
    engine
        .scan_folder(&h, false)
        .await
        .ok_or_else(|| format!("the scan of {folder} failed; see `ferry status`"))?;
    let done = {
        let _disk = h.disk.lock().await;
        let f = h.folder();
        let store = store.clone();
        with_index(home, move |index| {
            let open = index.open_conflicts(f.row, &rel)?;
            let Some(c) = open.first() else {
                return Err(HistoryError::Refused(format!(
                    "no open conflict of {}:{rel} (see `ferry conflicts`)",
                    f.id
                )));
            };
            resolve::resolve(index, &store, &f, c, keep)
        })
        .await
    };
    if done.as_ref().is_ok_and(|r| r.copy_removed) {
        engine.scan_folder(&h, false).await;
    }
    Ok(serde_json::to_value(done?).expect("resolutions serialize"))
}

/// `history`: the versions the connected peers keep of a path.
pub(super) async fn peer_history(
    Ctx { engine, .. }: Ctx<'_>,
    folder: String,
    path: Option<String>,
) -> Result<Value, String> {
    if engine.folder(&folder).is_none() {
        return Err(crate::folder::FolderError::Unknown(folder).to_string());
    }
    let rel = path
        .as_deref()
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty())
        .map(RelPath::new)
        .transpose()
        .map_err(|e| e.to_string())?;
    let mesh = engine.peer_history(&folder, rel.as_ref()).await;
    let mut versions: Vec<(i64, i64, Value)> = Vec::new();
    for p in &mesh.peers {
        for v in &p.versions {
            versions.push((v.superseded_at, v.id, peer_version_json(v, p)));
        }
    }
    versions.sort_by_key(|v| std::cmp::Reverse((v.0, v.1)));
    Ok(json!({
        "folder": folder,
        "path": rel.as_ref().map(RelPath::as_str),
        "versions": versions.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>(),
        "truncated": mesh.peers.iter().filter(|p| p.truncated)
            .map(|p| p.device.to_string()).collect::<Vec<_>>(),
        "errors": mesh.errors.iter().map(|e| json!({
            "device": e.device.to_string(), "name": e.name, "error": e.error,
        })).collect::<Vec<_>>(),
    }))
}

fn peer_version_json(
    v: &crate::protocol::WireVersion,
    p: &crate::sync::mesh::PeerVersions,
) -> Value {
    json!({
        "id": v.id, "path": v.path, "kind": FileKind::from_wire(v.kind), "size": v.size,
        "mtime_ns": v.mtime_ns, "permissions": format!("{:04o}", v.permissions),
        "hash": v.hash.map(|h| FileHash(h).to_hex()), "symlink_target": v.symlink_target,
        "modified_by": ShortId(v.modified_by).to_string(), "device": v.device,
        "superseded_at": v.superseded_at, "reason": v.reason,
        "device_holding": p.device.to_string(), "device_holding_name": p.name,
    })
}

/// What `restore-remote` was asked.
pub(super) struct RemoteRestore {
    pub(super) folder: String,
    pub(super) path: String,
    pub(super) device: String,
    pub(super) version: i64,
    pub(super) to: Option<PathBuf>,
    pub(super) force: bool,
}

/// `restore-remote`: fetches a version a peer keeps and writes it in place
/// (under the folder's disk lock, scanning before and after, like `restore`)
/// or to `to`.
pub(super) async fn restore_remote(
    Ctx { home, engine, .. }: Ctx<'_>,
    r: RemoteRestore,
) -> Result<Value, String> {
    let h = engine
        .folder(&r.folder)
        .ok_or_else(|| crate::folder::FolderError::Unknown(r.folder.clone()).to_string())?;
    let rel = RelPath::new(r.path.trim_matches('/')).map_err(|e| e.to_string())?;
    let peer = paired_device(home, &r.device).await?;
    let name = engine.device_label(peer).await;
    let outcome = match r.to {
        Some(dest) => {
            if !dest.is_absolute() {
                return Err(format!("{} is not an absolute path", dest.display()));
            }
            let exists = std::fs::symlink_metadata(&dest).ok();
            if exists.is_some() && !r.force {
                return Err(HistoryError::DestExists(dest).to_string());
            }
            if exists.is_some_and(|m| m.is_dir()) {
                return Err(format!(
                    "{} is a directory; give the file to write",
                    dest.display()
                ));
            }
            let parent = dest
                .parent()
                .ok_or_else(|| format!("{} is not a file name", dest.display()))?
                .to_owned();
            let fetched = engine
                .fetch_peer_version(&r.folder, &rel, peer, r.version, &parent)
                .await
                .map_err(|e| e.to_string())?;
            let size = fetched.size;
            let tmp = fetched.tmp;
            let to = dest.clone();
            tokio::task::spawn_blocking(move || {
                let moved = std::fs::rename(&tmp, &to)
                    .and_then(|()| std::fs::File::open(&parent)?.sync_all());
                if moved.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                moved.map_err(|e| format!("{}: {e}", to.display()))
            })
            .await
            .map_err(|e| format!("the restore task failed: {e}"))??;
            restore::Outcome {
                restored: vec![restore::Restored {
                    path: rel.to_string(),
                    version: Some(r.version),
                    size,
                    kept: None,
                    written_to: dest,
                }],
                ..restore::Outcome::default()
            }
        }
        None => {
            engine
                .scan_folder(&h, false)
                .await
                .ok_or_else(|| format!("the scan of {} failed; see `ferry status`", r.folder))?;
            let f = h.folder();
            check_root(&f).map_err(|e| e.to_string())?;
            let fetched = engine
                .fetch_peer_version(&r.folder, &rel, peer, r.version, &temp_dir(&f.path))
                .await
                .map_err(|e| e.to_string())?;
            let outcome = {
                let _disk = h.disk.lock().await;
                let f = h.folder();
                with_index(home, move |index| {
                    restore::restore_fetched_in_place(index, &f, &rel, fetched)
                })
                .await
            };
            if outcome.as_ref().is_ok_and(|o| !o.restored.is_empty()) {
                engine.scan_folder(&h, false).await;
            }
            outcome?
        }
    };
    let mut v = serde_json::to_value(outcome).expect("outcomes serialize");
    v["device"] = json!(peer.to_string());
    v["device_name"] = json!(name);
    Ok(v)
}

/// A paired device by id or by name.
pub(super) async fn paired_device(home: &Home, which: &str) -> Result<DeviceId, String> {
    let home = home.clone();
    let which = which.to_owned();
    tokio::task::spawn_blocking(move || {
        let index = home.index().map_err(|e| e.to_string())?;
        let peers = index.peers().map_err(|e| e.to_string())?;
        if let Ok(id) = which.parse::<DeviceId>()
            && peers.iter().any(|p| p.id == id)
        {
            return Ok(id);
        }
        let named: Vec<_> = peers.iter().filter(|p| p.name == which).collect();
        match named[..] {
            [p] => Ok(p.id),
            [] => Err(format!("no paired device {which} (see `ferry devices`)")),
            _ => Err(format!(
                "several paired devices are named {which}; give its id (see `ferry devices`)"
            )),
        }
    })
    .await
    .map_err(|e| format!("the restore task failed: {e}"))?
}
