//! The sync engine: keeps every shared folder identical with its peers in the
//! background.
//!
//! Per folder, one task scans on watcher events (debounced) and on a long
//! interval, and pulls what peers announced that this device lacks; scans and
//! pulls of one folder never overlap. Per link, [`link`] exchanges indexes
//! (only records the peer has not seen) and serves chunk requests. [`pull`]
//! decides with version vectors and puts remote versions in place atomically
//! and verified; [`conflict`] names the copies of concurrent changes.
//! [`backup`] sends folders, sealed, to the devices that hold them encrypted;
//! [`holder`] is the other side, storing and serving sealed folders it cannot
//! read; [`recover`] rebuilds a folder from a holder.

pub mod backup;
pub mod conflict;
mod gather;
mod history_hooks;
pub mod holder;
pub mod link;
pub mod mesh;
pub mod pull;
pub mod recover;
mod served;
mod verifier;
pub mod watch;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iroh::endpoint::Connection;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SyncConfig;
use crate::device::DeviceId;
use crate::folder::FolderType;
use crate::home::Home;
use crate::index::{Folder, SharedIndex};
use crate::protocol::IndexState;
use crate::scan::ScanOptions;

/// What a folder is doing, as `ferry status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FolderActivity {
    /// Nothing to do.
    Idle,
    /// Looking for local changes.
    Scanning,
    /// Pulling from peers.
    Syncing,
    /// The root or marker is missing, or the last scan failed.
    Error,
}

/// A folder's live state.
#[derive(Debug, Clone, Serialize)]
pub struct FolderStatus {
    /// Activity.
    pub state: FolderActivity,
    /// The last error, if any.
    pub error: Option<String>,
    /// Items still needed from peers at the last pass.
    pub need_items: u64,
    /// Bytes still needed at the last pass.
    pub need_bytes: u64,
    /// Why each needed item is not in sync yet (at most a few hundred).
    pub need: Vec<NeedItem>,
    /// Local deletes held back by the last scan (too many at once).
    pub held_deletes: u64,
    /// A lasting condition worth knowing (no watcher: scanning periodically).
    pub notice: Option<String>,
}

/// One item not in sync, and why.
#[derive(Debug, Clone, Serialize)]
pub struct NeedItem {
    /// Path.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// Why it is not in sync yet.
    pub reason: String,
}

/// Counters per peer.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Chunk bytes received and verified.
    pub chunk_bytes_in: AtomicU64,
    /// Chunk bytes served.
    pub chunk_bytes_out: AtomicU64,
    /// Chunks that failed their hash check.
    pub bad_chunks: AtomicU64,
    /// Records refused (unsafe paths, malformed fields).
    pub bad_records: AtomicU64,
    /// Requests refused (frames over the limit, malformed or unexpected
    /// requests); each also closes the link.
    pub bad_requests: AtomicU64,
    /// Requests to it that got no answer within the request timeout.
    pub stalled_requests: AtomicU64,
}

/// One folder's handles.
pub struct FolderHandle {
    /// The folder as last loaded.
    pub folder: Mutex<Folder>,
    /// Wakes the folder task: peers announced something.
    pub remote_changed: Notify,
    /// Wakes the folder task: scan now.
    pub scan_now: Notify,
    /// Serialises scans and pulls of this folder.
    pub disk: tokio::sync::Mutex<()>,
    /// The scanner's own index connection (so a scan never blocks the
    /// agent's other index work), opened at the first scan.
    scanner: Arc<Mutex<Option<crate::index::Index>>>,
    /// Large files the watcher named, hashed while its debounce runs; the
    /// next scan takes those still in the state they were hashed in.
    prehashed: Arc<crate::scan::Prehashed>,
    /// The index connection that hashing ahead reads old chunk lists with.
    prehasher: Arc<Mutex<Option<crate::index::Index>>>,
    /// Live state.
    pub status: Mutex<FolderStatus>,
    /// The folder's filesystem treats names differing by case as one.
    pub case_insensitive: bool,
    /// The folder's filesystem treats a name in NFC and in NFD as one (as
    /// macOS does): such names from peers are reported, not written.
    pub normalizing: bool,
    /// The next pull undoes local changes (`ferry revert`, receive-only).
    pub revert: std::sync::atomic::AtomicBool,
    /// A pull pass is placing files (the state a scan ends in).
    pub pulling: std::sync::atomic::AtomicBool,
    /// Temp files of pulls that did not finish (found by scans, or left by
    /// failed pulls): removed once no pull needs them.
    pub leftover_temps: Mutex<HashSet<PathBuf>>,
    /// The temp files pulls are renaming into place (the watcher ignores
    /// those renames).
    pub placing: watch::Placing,
    stop: CancellationToken,
}

impl FolderHandle {
    /// A copy of the folder record.
    pub fn folder(&self) -> Folder {
        self.folder.lock().expect("folder lock").clone()
    }

    fn set_state(&self, state: FolderActivity) {
        self.status.lock().expect("status lock").state = state;
    }
}

/// The engine.
pub struct Engine {
    home: Home,
    index: SharedIndex,
    me: DeviceId,
    /// Bumped when the agent reloads its config; folder tasks then take on
    /// a new debounce or rescan interval.
    config_gen: tokio::sync::watch::Sender<u64>,
    folders: Mutex<HashMap<String, Arc<FolderHandle>>>,
    links: Mutex<HashMap<DeviceId, Connection>>,
    /// The folder ids each connected peer shares with this device.
    peer_folders: Mutex<HashMap<DeviceId, HashSet<String>>>,
    /// The folder ids each connected peer holds (or is offered) encrypted.
    peer_vaults: tokio::sync::watch::Sender<HashMap<DeviceId, HashSet<String>>>,
    counters: Mutex<HashMap<DeviceId, Arc<PeerCounters>>>,
    /// Recent answers of "which folders do we share with this peer".
    shared_cache: Mutex<HashMap<DeviceId, (std::time::Instant, Vec<String>)>>,
    /// Chunk lists of the large files served lately (see `served`).
    served: served::Served,
    /// Bumped after every local index commit (scan or pull).
    local_changes: tokio::sync::watch::Sender<u64>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine for the home's folders; call [`Engine::start`].
    pub fn new(home: Home, index: SharedIndex, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            me: home.device_id(),
            config_gen: tokio::sync::watch::channel(0).0,
            home,
            index,
            folders: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            peer_folders: Mutex::new(HashMap::new()),
            peer_vaults: tokio::sync::watch::channel(HashMap::new()).0,
            counters: Mutex::new(HashMap::new()),
            shared_cache: Mutex::new(HashMap::new()),
            served: Default::default(),
            local_changes: tokio::sync::watch::channel(0).0,
            tracker: TaskTracker::new(),
            shutdown,
        })
    }

    /// Starts a task per folder, and a poll that picks up folders added or
    /// removed by the CLI while the agent runs.
    pub async fn start(self: &Arc<Self>) -> Result<(), crate::index::IndexError> {
        self.reload_folders().await?;
        let this = self.clone();
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = this.shutdown.cancelled() => return,
                }
                if let Err(e) = this.reload_folders().await {
                    tracing::warn!("cannot reload folders: {e}");
                }
            }
        });
        Ok(())
    }

    /// Brings the folder tasks in line with the index.
    pub async fn reload_folders(self: &Arc<Self>) -> Result<(), crate::index::IndexError> {
        self.shared_cache.lock().expect("shared cache lock").clear();
        let list = self.index.run(|i| i.folders()).await?;
        let mut started = Vec::new();
        {
            let mut folders = self.folders.lock().expect("folders lock");
            let ids: HashSet<String> = list.iter().map(|f| f.id.to_string()).collect();
            folders.retain(|id, h| {
                let keep = ids.contains(id);
                if !keep {
                    h.stop.cancel();
                }
                keep
            });
            for f in list {
                match folders.get(f.id.as_str()) {
                    Some(h) => *h.folder.lock().expect("folder lock") = f,
                    None => {
                        let h = Arc::new(FolderHandle {
                            folder: Mutex::new(f.clone()),
                            remote_changed: Notify::new(),
                            scan_now: Notify::new(),
                            disk: tokio::sync::Mutex::new(()),
                            scanner: Arc::new(Mutex::new(None)),
                            prehashed: Arc::default(),
                            prehasher: Arc::new(Mutex::new(None)),
                            status: Mutex::new(FolderStatus {
                                state: FolderActivity::Idle,
                                error: None,
                                need_items: 0,
                                need_bytes: 0,
                                need: Vec::new(),
                                held_deletes: f.held_deletes,
                                notice: None,
                            }),
                            revert: std::sync::atomic::AtomicBool::new(false),
                            pulling: std::sync::atomic::AtomicBool::new(false),
                            leftover_temps: Mutex::new(HashSet::new()),
                            placing: watch::Placing::default(),
                            case_insensitive: case_insensitive(&f.path),
                            normalizing: normalizing(&f.path),
                            stop: self.shutdown.child_token(),
                        });
                        folders.insert(f.id.to_string(), h.clone());
                        started.push(h);
                    }
                }
            }
        }
        for h in started {
            let this = self.clone();
            self.tracker.spawn(async move { this.run_folder(h).await });
        }
        Ok(())
    }

    /// The `[sync]` settings in use now.
    pub fn sync_config(&self) -> SyncConfig {
        self.home.config().sync.clone()
    }

    /// How long a request to a peer, or its answer, may take.
    pub fn request_timeout(&self) -> std::time::Duration {
        self.home.config().sync.request_timeout()
    }

    /// The home's config was replaced ([`Home::set_config`]): scans and
    /// pulls read it as they start; this wakes the folder tasks so they take
    /// on a new debounce and rescan interval, and gives the scanners' index
    /// connections the new local-history setting.
    pub fn config_changed(&self) {
        let local = self.home.config().local_history();
        for h in self.folders.lock().expect("folders lock").values() {
            if let Some(i) = h.scanner.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                i.set_local_history(local.clone());
            }
        }
        self.config_gen.send_modify(|n| *n += 1);
    }

    /// The handle of a folder by id.
    pub fn folder(&self, id: &str) -> Option<Arc<FolderHandle>> {
        self.folders.lock().expect("folders lock").get(id).cloned()
    }

    /// Every folder's live state, by folder id.
    pub fn statuses(&self) -> HashMap<String, FolderStatus> {
        self.folders
            .lock()
            .expect("folders lock")
            .iter()
            .map(|(id, h)| (id.clone(), h.status.lock().expect("status lock").clone()))
            .collect()
    }

    /// The counters of a peer.
    pub fn counters(&self, peer: &DeviceId) -> Arc<PeerCounters> {
        self.counters
            .lock()
            .expect("counters lock")
            .entry(*peer)
            .or_default()
            .clone()
    }

    /// What this device holds of `peer`'s index, per folder shared with it, for
    /// the hello.
    pub async fn index_states(&self, peer: DeviceId) -> Vec<IndexState> {
        let r = self
            .index
            .run(
                move |i| -> Result<Vec<IndexState>, crate::index::IndexError> {
                    let mut out = Vec::new();
                    for (fid, _) in i.folders_shared_with(&peer)? {
                        let Some(f) = i.folder(&fid)? else { continue };
                        let (epoch, sequence) = i.remote_index_state(f.row, &peer)?;
                        out.push(IndexState {
                            folder: fid.to_string(),
                            epoch,
                            sequence,
                        });
                    }
                    Ok(out)
                },
            )
            .await;
        r.unwrap_or_else(|e| {
            tracing::warn!("cannot read index states: {e}");
            Vec::new()
        })
    }

    /// Notes the folders a peer shares with this device (from its hello or a
    /// later update), and wakes link senders so new folders start flowing.
    pub fn set_peer_folders(&self, peer: DeviceId, folders: impl IntoIterator<Item = String>) {
        self.peer_folders
            .lock()
            .expect("peer folders lock")
            .insert(peer, folders.into_iter().collect());
        self.local_changes.send_modify(|n| *n += 1);
    }

    /// Records which folders a connected peer lists as held encrypted.
    pub fn set_peer_vaults(&self, peer: DeviceId, folders: impl IntoIterator<Item = String>) {
        let folders: HashSet<String> = folders.into_iter().collect();
        self.peer_vaults.send_modify(|m| {
            m.insert(peer, folders);
        });
    }

    /// A connected peer's link, if any.
    pub fn link(&self, peer: &DeviceId) -> Option<Connection> {
        self.links
            .lock()
            .expect("links lock")
            .get(peer)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// Which folders are shared with which device changed.
    pub fn shares_changed(&self) {
        self.shared_cache.lock().expect("shared cache lock").clear();
        self.local_changed();
    }

    /// Tells link senders that local records changed.
    pub fn local_changed(&self) {
        self.local_changes.send_modify(|n| *n += 1);
    }

    /// The folders synced with `peer` right now: shared with it here, and
    /// shared with this device there.
    pub async fn synced_with(&self, peer: DeviceId) -> Vec<Folder> {
        let theirs = self
            .peer_folders
            .lock()
            .expect("peer folders lock")
            .get(&peer)
            .cloned()
            .unwrap_or_default();
        if theirs.is_empty() {
            return Vec::new();
        }
        // Asked for every request a peer makes: keep our side's answer briefly.
        let cached = self
            .shared_cache
            .lock()
            .expect("shared cache lock")
            .get(&peer)
            .filter(|(at, _)| at.elapsed() < Duration::from_secs(2))
            .map(|(_, ids)| ids.clone());
        let ours = match cached {
            Some(ids) => ids,
            None => {
                let ids: Vec<String> = self
                    .index
                    .run(move |i| i.folders_shared_with(&peer))
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(id, _)| id.to_string())
                    .collect();
                self.shared_cache
                    .lock()
                    .expect("shared cache lock")
                    .insert(peer, (std::time::Instant::now(), ids.clone()));
                ids
            }
        };
        ours.into_iter()
            .filter(|id| theirs.contains(id.as_str()))
            .filter_map(|id| self.folder(&id).map(|h| h.folder()))
            .collect()
    }

    /// Stops every task and waits for them.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// The folder task: scan at start, then on watcher events, rescans and
    /// remote changes, pulling after each.
    async fn run_folder(self: Arc<Self>, h: Arc<FolderHandle>) {
        let root: PathBuf = h.folder().path;
        let mut config_gen = self.config_gen.subscribe();
        let mut debounce_ms = self.sync_config().debounce_ms;
        let (mut watcher, mut events) = self.start_watcher(&h, &root, debounce_ms);
        let mut scan_due = true;
        let mut pull_due = true;
        let mut retry = Duration::from_secs(1);
        // When set, pull again at this time (items failed; backing off).
        let mut retry_at: Option<tokio::time::Instant> = None;
        // A pull that keeps asking for a rescan that finds nothing new must not
        // spin: after a few in a row, back off like any other retry.
        let mut rescans = 0;
        // The pull pass under way: it runs beside this loop, so local changes
        // are scanned (and recorded, and kept in the history) while a long
        // pull waits on the network; one pass at a time.
        let mut pulling: Option<tokio::task::JoinHandle<Result<pull::Outcome, String>>> = None;
        // Hashing ahead of the next scan (see `prehash`).
        let mut prehashing: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            if scan_due {
                scan_due = false;
                // The scan takes what it hashed rather than read it again.
                if let Some(task) = prehashing.take() {
                    let _ = task.await;
                }
                self.scan_folder(&h, false).await;
                pull_due = true;
            }
            if pull_due && pulling.is_none() {
                pull_due = false;
                retry_at = None;
                let (engine, handle) = (self.clone(), h.clone());
                pulling = Some(tokio::spawn(async move {
                    pull::pull_folder(&engine, &handle).await
                }));
            }
            let wake = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            // Without a watcher, scan every 10 s instead of hourly.
            let rescan = if events.is_some() {
                Duration::from_secs(self.sync_config().rescan_interval_secs)
            } else {
                Duration::from_secs(10)
            };
            tokio::select! {
                _ = h.stop.cancelled() => {
                    // The links are down by now: the pass ends soon.
                    if let Some(task) = pulling.take() {
                        let _ = task.await;
                    }
                    return;
                }
                done = async {
                    match pulling.as_mut() {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                } => {
                    pulling = None;
                    match done.unwrap_or_else(|e| Err(format!("the pull task failed: {e}"))) {
                        Ok(pull::Outcome::Done) => {
                            retry = Duration::from_secs(1);
                            rescans = 0;
                        }
                        Ok(pull::Outcome::Rescan) if rescans < 3 => {
                            rescans += 1;
                            scan_due = true;
                        }
                        again => {
                            if let Err(e) = again {
                                tracing::warn!(folder = %h.folder().id, "pull failed: {e}");
                            }
                            retry_at = Some(tokio::time::Instant::now() + retry);
                            retry = (retry * 2).min(Duration::from_secs(60));
                        }
                    }
                }
                Ok(()) = config_gen.changed() => {
                    let now = self.sync_config().debounce_ms;
                    if now != debounce_ms && watcher.is_some() {
                        debounce_ms = now;
                        drop(watcher.take());
                        (watcher, events) = self.start_watcher(&h, &root, debounce_ms);
                        // Changes between the two watchers would be missed.
                        scan_due = true;
                    }
                }
                _ = h.remote_changed.notified() => pull_due = true,
                _ = h.scan_now.notified() => scan_due = true,
                _ = wake => pull_due = true,
                _ = tokio::time::sleep(rescan) => scan_due = true,
                ev = async {
                    match events.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match ev {
                    Some(watch::Watched::Changed { after_hint }) => {
                        if after_hint {
                            // Also drops what a hashing ahead under way
                            // would still store.
                            h.prehashed.clear();
                        }
                        scan_due = true;
                    }
                    Some(watch::Watched::Paused(paths)) => {
                        if prehashing.as_ref().is_none_or(|t| t.is_finished()) {
                            prehashing = Some(self.prehash(&h, paths));
                        }
                    }
                    None => events = None,
                },
            }
        }
    }

    /// Watches a folder root; without a watcher (limits reached), notes why
    /// in the folder's status and returns none.
    fn start_watcher(
        &self,
        h: &FolderHandle,
        root: &std::path::Path,
        debounce_ms: u64,
    ) -> (
        Option<notify::RecommendedWatcher>,
        Option<tokio::sync::mpsc::Receiver<watch::Watched>>,
    ) {
        match watch::watch(root, debounce_ms, h.placing.clone()) {
            Ok((w, rx)) => (Some(w), Some(rx)),
            Err(e) => {
                tracing::warn!(folder = %h.folder().id, "{e}; falling back to periodic scans");
                h.status.lock().expect("status lock").notice = Some(e.to_string());
                (None, None)
            }
        }
    }

    /// Hashes the large files among `paths` (which the watcher saw written
    /// or moved in) for the next scan, on a blocking thread, while the
    /// watcher's debounce runs: a saved file then reaches peers sooner by
    /// about its hashing time (a quarter second per GiB here). Nothing is
    /// recorded; the scan checks each file still shows the state it was
    /// hashed in (see `scan::prehash`). Takes no disk lock: it only reads.
    fn prehash(&self, h: &Arc<FolderHandle>, paths: Vec<PathBuf>) -> tokio::task::JoinHandle<()> {
        let folder = h.folder();
        let rel: Vec<crate::relpath::RelPath> = paths
            .iter()
            .filter_map(|p| p.strip_prefix(&folder.path).ok())
            .filter_map(|r| crate::relpath::RelPath::from_fs(r).ok())
            .collect();
        let params = ScanOptions::from(&self.home.config().scan).params;
        let (home, slot, into, stop) = (
            self.home.clone(),
            h.prehasher.clone(),
            h.prehashed.clone(),
            h.stop.clone(),
        );
        tokio::task::spawn_blocking(move || {
            if rel.is_empty() {
                return;
            }
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            let index = match opened(&mut slot, &home) {
                Ok(i) => i,
                Err(e) => {
                    tracing::debug!(folder = %folder.id, "not hashing ahead: {e}");
                    return;
                }
            };
            let started = std::time::Instant::now();
            let stopped = || stop.is_cancelled();
            let files = crate::scan::prehash(index, &folder, &rel, params, &into, &stopped);
            if files > 0 {
                tracing::debug!(
                    folder = %folder.id, files,
                    ms = started.elapsed().as_millis() as u64,
                    "hashed ahead of the scan"
                );
            }
        })
    }

    /// Scans a folder with its own index connection (so the agent's other work
    /// is not blocked), then wakes the link senders.
    pub async fn scan_folder(&self, h: &Arc<FolderHandle>, confirm_deletes: bool) -> Option<u64> {
        let _disk = h.disk.lock().await;
        h.set_state(FolderActivity::Scanning);
        let folder = h.folder();
        let home = self.home.clone();
        let mut opts = ScanOptions::from(&self.home.config().scan);
        opts.confirm_deletes = confirm_deletes;
        opts.prehashed = Some(h.prehashed.clone());
        let me = self.me.short();
        let scanner = h.scanner.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut slot = scanner.lock().unwrap_or_else(|p| p.into_inner());
            let index = opened(&mut slot, &home).map_err(|e| e.to_string())?;
            let report = crate::scan::scan(index, &folder, me, &opts, &crate::scan::NoProgress);
            // What the scan did not take no longer describes the folder.
            opts.prehashed.iter().for_each(|p| p.clear());
            report.map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("scan task failed: {e}")));
        let mut st = h.status.lock().expect("status lock");
        match result {
            Ok(report) => {
                for t in &report.stale_temps {
                    tracing::info!(path = %t.display(), "removing the temp file of a pull abandoned a day ago");
                    let _ = std::fs::remove_file(t);
                }
                h.leftover_temps
                    .lock()
                    .expect("temps lock")
                    .extend(report.temps.iter().cloned());
                st.state = if h.pulling.load(std::sync::atomic::Ordering::SeqCst) {
                    FolderActivity::Syncing
                } else {
                    FolderActivity::Idle
                };
                st.error = None;
                st.held_deletes = report.held_deletes;
                if report.held_deletes > 0 {
                    tracing::warn!(
                        folder = %h.folder().id, held = report.held_deletes,
                        "a scan found too many deletes at once; holding them back until `ferry folder confirm-deletes`"
                    );
                }
                let deleted = report.deleted;
                if report.new + report.changed + report.deleted > 0 {
                    tracing::info!(
                        folder = %h.folder().id,
                        new = report.new, changed = report.changed, deleted = report.deleted,
                        "local changes"
                    );
                    tracing::debug!(
                        folder = %h.folder().id,
                        hashed_bytes = report.hashed_bytes, reused_chunks = report.reused_chunks,
                        prehashed_files = report.prehashed_files,
                        "scan read"
                    );
                    drop(st);
                    self.local_changed();
                }
                Some(deleted)
            }
            Err(e) => {
                tracing::warn!(folder = %h.folder().id, "scan failed: {e}");
                st.state = FolderActivity::Error;
                st.error = Some(e);
                None
            }
        }
    }

    /// Whether remote changes are applied to this folder.
    fn receives(folder: &Folder) -> bool {
        folder.folder_type != FolderType::SendOnly
    }
}

/// Whether the filesystem under `root` ignores case in names (probed with a
/// file in the folder's marker directory).
/// The index connection kept in `slot`, opened on first use.
fn opened<'a>(
    slot: &'a mut Option<crate::index::Index>,
    home: &Home,
) -> Result<&'a mut crate::index::Index, crate::home::HomeError> {
    match slot {
        Some(i) => Ok(i),
        None => Ok(slot.insert(home.index()?)),
    }
}

fn case_insensitive(root: &std::path::Path) -> bool {
    same_name(root, "CaseProbe", "caseprobe")
}

/// Whether the filesystem under `root` treats a name in NFD and in NFC as
/// one ("e" + combining acute, then "é").
fn normalizing(root: &std::path::Path) -> bool {
    same_name(root, "NormProbe-e\u{301}", "NormProbe-\u{e9}")
}

/// Whether a file made as `made` in the folder's marker directory is found
/// as `other`.
fn same_name(root: &std::path::Path, made: &str, other: &str) -> bool {
    let dir = crate::folder::marker_dir(root);
    let pid = std::process::id();
    let probe = dir.join(format!("{made}-{pid}"));
    if std::fs::write(&probe, b"").is_err() {
        return false;
    }
    let same = std::fs::symlink_metadata(dir.join(format!("{other}-{pid}"))).is_ok();
    let _ = std::fs::remove_file(&probe);
    same
}
