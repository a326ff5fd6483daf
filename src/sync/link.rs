//! What runs on a link once hellos are exchanged: the index sender and
//! receiver (one uni-stream each way), the request server (chunks, groups, and
//! the versions this device keeps in its history), and the client side of
//! those requests.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use iroh::endpoint::{Connection, RecvStream, SendStream};

use super::Engine;
use super::served::{MIN_SIZE as SERVED_MIN_SIZE, Served, Stat};
use super::wire::{from_wire, to_wire};
use crate::chunking::{ChunkHash, FileHash, group_ranges};
use crate::device::DeviceId;
use crate::index::{FileKind, IndexError};
use crate::protocol::{
    IndexMessage, IndexState, MAX_CHUNKS_PER_REPLY, MAX_FRAME, MAX_GROUPS_PER_REQUEST,
    MAX_VERSIONS_PER_REPLY, ProtocolError, Reply, Request, WireChunk, WireVersion, encode,
    read_msg, write_msg,
};
use crate::relpath::RelPath;

/// QUIC close code for a peer that sent something unsafe or malformed.
pub const CLOSE_PROTOCOL: u32 = 5;
/// Records per index update (also bounded by size, see [`BATCH_BYTES`]).
const BATCH_FILES: usize = 1000;
/// Rough encoded size at which an index update is sent.
const BATCH_BYTES: usize = 512 * 1024;
/// How long a request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The link failed or closed.
    #[error("link error: {0}")]
    Link(String),
    /// The peer could not serve it.
    #[error("the peer does not have it: {0}")]
    Unavailable(String),
    /// The peer sent bytes that do not match the hash asked for.
    #[error("the peer sent data that does not match its hash")]
    Corrupt,
    /// The peer broke the protocol.
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
}

/// Runs the sync side of a link until it closes.
pub async fn run(engine: Arc<Engine>, conn: Connection, peer: DeviceId, theirs: Vec<IndexState>) {
    engine
        .links
        .lock()
        .expect("links lock")
        .insert(peer, conn.clone());
    // The four run until the link closes; one ending early (a peer that
    // finished its index stream) does not stop the others.
    let sender = async {
        if let Err(e) = send_index(&engine, &conn, peer, theirs).await
            && conn.close_reason().is_none()
        {
            // Without a sender the peer would silently fall behind: start over.
            tracing::warn!(device = %peer, "index sender failed ({e}); reconnecting");
            conn.close(0u32.into(), b"index sender failed");
        }
    };
    let receiver = async {
        if let Err(e) = receive_index(&engine, &conn, peer).await {
            tracing::debug!(device = %peer, "index receiver: {e}");
        }
    };
    let server = serve(&engine, &conn, peer);
    let backup = super::backup::run(engine.clone(), conn.clone(), peer);
    tokio::select! {
        _ = async { tokio::join!(sender, receiver, server, backup) } => {},
        _ = engine.shutdown.cancelled() => {},
    }
    let mut links = engine.links.lock().expect("links lock");
    if links
        .get(&peer)
        .is_some_and(|c| c.stable_id() == conn.stable_id())
    {
        links.remove(&peer);
    }
}

/// Sends the records the peer lacks, then new ones as they commit.
async fn send_index(
    engine: &Arc<Engine>,
    conn: &Connection,
    peer: DeviceId,
    theirs: Vec<IndexState>,
) -> Result<(), String> {
    let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
    let theirs: HashMap<String, IndexState> =
        theirs.into_iter().map(|s| (s.folder.clone(), s)).collect();
    // Per folder id: (epoch sent under, highest sequence sent).
    let mut sent: HashMap<String, (u64, u64)> = HashMap::new();
    let mut changes = engine.local_changes.subscribe();
    loop {
        changes.borrow_and_update();
        for folder in engine.synced_with(peer).await {
            let id = folder.id.to_string();
            let (row, epoch) = (folder.row, folder.epoch);
            let from = match sent.get(&id) {
                Some(&(e, s)) if e == epoch => s,
                _ => theirs
                    .get(&id)
                    .filter(|s| s.epoch == epoch)
                    .map_or(0, |s| s.sequence),
            };
            // A receive-only folder does not send its own local changes.
            let skip = (folder.folder_type == crate::folder::FolderType::ReceiveOnly)
                .then(|| engine.me.short());
            let last = send_folder(engine, &mut stream, &id, row, epoch, from, skip).await?;
            sent.insert(id, (epoch, last));
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return Ok(()) },
            _ = conn.closed() => return Ok(()),
            // New folders may become shared without a local change.
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Sends one folder's records above `from`; returns the highest sequence sent.
async fn send_folder(
    engine: &Arc<Engine>,
    stream: &mut SendStream,
    folder_id: &str,
    row: i64,
    epoch: u64,
    mut from: u64,
    skip_from: Option<crate::device::ShortId>,
) -> Result<u64, String> {
    loop {
        let batch = engine
            .index
            .run(move |i| -> Result<_, IndexError> {
                let recs = i.local_since(row, from, BATCH_FILES)?;
                let mut out = Vec::with_capacity(recs.len());
                let mut bytes = 0;
                let mut last = from;
                for r in recs {
                    let chunks = if r.record.kind == FileKind::File && !r.record.deleted {
                        i.file_chunks(row, &r.record.path)?
                    } else {
                        Vec::new()
                    };
                    last = r.record.sequence;
                    if skip_from == Some(r.record.modified_by) {
                        continue;
                    }
                    let w = to_wire(&r, &chunks);
                    bytes += 128 + w.path.len() + w.groups.len() * 48 + w.version.len() * 16;
                    out.push(w);
                    if bytes > BATCH_BYTES {
                        break;
                    }
                }
                Ok((out, last))
            })
            .await
            .map_err(|e| e.to_string())?;
        let (files, last) = batch;
        if last == from {
            return Ok(from);
        }
        if files.is_empty() {
            from = last;
            continue;
        }
        let msg = IndexMessage::Update {
            folder: folder_id.to_owned(),
            epoch,
            sequence: last,
            files,
        };
        write_msg(stream, &msg).await.map_err(|e| e.to_string())?;
        from = last;
    }
}

/// Stores the records the peer sends and wakes the folders they belong to.
/// An unsafe or malformed record closes the link.
async fn receive_index(
    engine: &Arc<Engine>,
    conn: &Connection,
    peer: DeviceId,
) -> Result<(), String> {
    let mut stream = conn.accept_uni().await.map_err(|e| e.to_string())?;
    loop {
        let msg = match read_msg::<IndexMessage>(&mut stream).await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(ProtocolError::Io(e)) => return Err(format!("index stream: {e}")),
            Err(e) => {
                engine
                    .counters(&peer)
                    .bad_records
                    .fetch_add(1, Ordering::Relaxed);
                refuse(conn, peer, &e.to_string());
                return Err(e.to_string());
            }
        };
        let IndexMessage::Update {
            folder,
            epoch,
            sequence,
            files,
        } = msg;
        // Folders added here (a join, an accept) are loaded before this device
        // announces them, so a peer only sends indexes of folders known here.
        let shared = engine
            .synced_with(peer)
            .await
            .into_iter()
            .find(|f| f.id.as_str() == folder);
        let Some(f) = shared else {
            tracing::debug!(device = %peer, %folder, "index for a folder not shared with it; ignored");
            continue;
        };
        let mut records = Vec::with_capacity(files.len());
        for w in files {
            match from_wire(w) {
                Ok(r) => records.push(r),
                Err(e) => {
                    engine
                        .counters(&peer)
                        .bad_records
                        .fetch_add(1, Ordering::Relaxed);
                    refuse(conn, peer, &e.to_string());
                    return Err(e.to_string());
                }
            }
        }
        let row = f.row;
        let n = records.len();
        let differ = engine
            .index
            .run(move |i| i.store_remote(row, &peer, epoch, sequence, &records))
            .await
            .map_err(|e| e.to_string())?;
        tracing::debug!(device = %peer, %folder, records = n, differ, sequence, "index update stored");
        // Records that match ours (a peer announcing what it pulled from here)
        // need no pull pass. An empty update is a nudge to retry now.
        if (differ > 0 || n == 0)
            && let Some(h) = engine.folder(&folder)
        {
            h.remote_changed.notify_one();
        }
    }
}

fn refuse(conn: &Connection, peer: DeviceId, why: &str) {
    tracing::warn!(device = %peer, "refusing the device's link: it sent {why}");
    conn.close(
        CLOSE_PROTOCOL.into(),
        format!("protocol violation: {why}").as_bytes(),
    );
}

/// Serves chunk and group requests until the link closes.
async fn serve(engine: &Arc<Engine>, conn: &Connection, peer: DeviceId) {
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => break,
        };
        let engine = engine.clone();
        let conn = conn.clone();
        // A peer that stalls mid-request holds its task and stream only this
        // long; QUIC's stream limit bounds how many it holds at once.
        let limit = engine.request_timeout();
        tasks.spawn(async move {
            match tokio::time::timeout(limit, serve_one(&engine, peer, send, recv)).await {
                Ok(Ok(())) => {}
                Ok(Err(ServeError::Protocol(e))) => {
                    let n = engine
                        .counters(&peer)
                        .bad_requests
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    tracing::warn!(device = %peer, bad_requests = n, "refused a request");
                    refuse(&conn, peer, &e)
                }
                Ok(Err(ServeError::Store(e))) => {
                    tracing::warn!(device = %peer, "serving a request: {e}");
                }
                Ok(Err(ServeError::Link(e))) => {
                    tracing::debug!(device = %peer, "request: {e}");
                }
                Err(_) => tracing::debug!(device = %peer, "request timed out"),
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

pub(super) enum ServeError {
    /// This device's index failed while serving (answered, not the peer's
    /// fault).
    Store(String),
    Protocol(String),
    Link(String),
}

async fn serve_one(
    engine: &Arc<Engine>,
    peer: DeviceId,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), ServeError> {
    let req = match read_msg::<Request>(&mut recv).await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(ProtocolError::Io(e)) => return Err(ServeError::Link(e.to_string())),
        Err(e) => return Err(ServeError::Protocol(e.to_string())),
    };
    if super::holder::is_vault_request(&req) {
        return super::holder::serve(engine, peer, req, &mut send, &mut recv).await;
    }
    let folder_id = match &req {
        Request::Chunk { folder, .. }
        | Request::Groups { folder, .. }
        | Request::History { folder, .. }
        | Request::VersionChunks { folder, .. } => folder.clone(),
        _ => return Err(ServeError::Protocol("an unexpected request".into())),
    };
    let folder = engine
        .synced_with(peer)
        .await
        .into_iter()
        .find(|f| f.id.as_str() == folder_id);
    let Some(folder) = folder else {
        return reply(
            &mut send,
            &Reply::Unavailable {
                reason: format!("folder {folder_id} is not shared with you"),
            },
            None,
        )
        .await;
    };
    match req {
        Request::Chunk {
            path,
            offset,
            size,
            hash,
            ..
        } => {
            let hash = ChunkHash(hash);
            let row = folder.row;
            let root = folder.path.clone();
            // Fast path: the place the peer named, if it holds those bytes (the
            // hash check makes the hint safe to follow; no symlinked parents).
            // A large file unchanged since it was hashed is vouched for by its
            // recorded chunk list instead (see `served`).
            // First on this worker if nothing in it can be slow, else on a
            // blocking thread (see `Reach`).
            let rel = RelPath::new(&path).ok();
            let cached = rel.as_ref().and_then(|rel| {
                read_hinted(
                    &engine.served,
                    row,
                    &root,
                    rel,
                    offset,
                    size,
                    &hash,
                    Reach::Cached,
                )
            });
            let hinted = match (cached, rel) {
                (Some(h), _) => Some(h),
                (None, Some(rel)) => {
                    let (root, engine) = (root.clone(), engine.clone());
                    tokio::task::spawn_blocking(move || {
                        let served = &engine.served;
                        read_hinted(served, row, &root, &rel, offset, size, &hash, Reach::Any)
                    })
                    .await
                    .ok()
                    .flatten()
                }
                (None, None) => None,
            };
            // A large file with no list kept for its stat: keep its list for
            // the next requests (this one was checked by hash).
            if let Some(stat) = hinted.as_ref().and_then(|h| h.unlisted) {
                keep_list(engine, row, &path, stat).await;
            }
            let hinted = hinted.and_then(|h| h.bytes);
            let live = match hinted {
                Some(d) => Some(d),
                None => {
                    let root = root.clone();
                    engine
                        .index
                        .run(move |i| i.chunk_sources_in(row, &hash, 8))
                        .await
                        .ok()
                        .and_then(|sources| {
                            sources.into_iter().find_map(|(p, o, s)| {
                                (s == size)
                                    .then(|| read_verified(&p.to_fs(&root), o, s, &hash))
                                    .flatten()
                            })
                        })
                }
            };
            // No live file has it: a version this device keeps of this folder
            // (a peer restoring from here) may.
            let data = match live {
                Some(d) => Some(d),
                None => history_chunk(engine, row, root, hash, size).await,
            };
            match data {
                Some(bytes) => {
                    engine
                        .counters(&peer)
                        .chunk_bytes_out
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    reply(&mut send, &Reply::Chunk { size }, Some(bytes)).await
                }
                None => {
                    reply(
                        &mut send,
                        &Reply::Unavailable {
                            reason: "chunk not available (file changed?)".into(),
                        },
                        None,
                    )
                    .await
                }
            }
        }
        Request::Groups {
            path,
            file_hash,
            groups,
            ..
        } => {
            let Ok(path) = RelPath::new(&path) else {
                return Err(ServeError::Protocol(format!(
                    "an unsafe path {path:?} in a request"
                )));
            };
            let row = folder.row;
            let got = engine
                .index
                .run(
                    move |i| -> Result<Option<Vec<Vec<WireChunk>>>, IndexError> {
                        let Some(f) = i.local_file(row, &path)? else {
                            return Ok(None);
                        };
                        if f.record.deleted || f.record.hash != Some(FileHash(file_hash)) {
                            return Ok(None);
                        }
                        let chunks = i.file_chunks(row, &path)?;
                        let ranges = group_ranges(&chunks);
                        let mut out = Vec::with_capacity(groups.len());
                        for g in groups {
                            let Some(r) = ranges.get(g as usize) else {
                                return Ok(None);
                            };
                            out.push(
                                chunks[r.clone()]
                                    .iter()
                                    .map(|c| WireChunk {
                                        hash: c.hash.0,
                                        size: c.len,
                                    })
                                    .collect(),
                            );
                        }
                        Ok(Some(out))
                    },
                )
                .await
                .ok()
                .flatten();
            match got {
                Some(groups) => reply(&mut send, &Reply::Groups { groups }, None).await,
                None => {
                    reply(
                        &mut send,
                        &Reply::Unavailable {
                            reason: "that version of the file is gone".into(),
                        },
                        None,
                    )
                    .await
                }
            }
        }
        Request::History { path, .. } => {
            let path = if path.is_empty() {
                None
            } else {
                match RelPath::new(&path) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        return Err(ServeError::Protocol(format!(
                            "an unsafe path {path:?} in a request"
                        )));
                    }
                }
            };
            let row = folder.row;
            let got = engine
                .index
                .run(move |i| -> Result<_, IndexError> {
                    let all = i.history_of(row, path.as_ref(), true)?;
                    Ok(versions_reply(all))
                })
                .await;
            let msg = match got {
                Ok(r) => r,
                Err(e) => Reply::Unavailable {
                    reason: format!("cannot read the history: {e}")
                        .chars()
                        .take(200)
                        .collect(),
                },
            };
            reply(&mut send, &msg, None).await
        }
        Request::VersionChunks { id, start, .. } => {
            let row = folder.row;
            let got = engine
                .index
                .run(move |i| -> Result<Option<Reply>, IndexError> {
                    match i.history_version(id)? {
                        Some(v) if v.folder == row => {}
                        _ => return Ok(None),
                    }
                    let all = i.history_chunks(id)?;
                    let start = (start as usize).min(all.len());
                    let end = (start + MAX_CHUNKS_PER_REPLY).min(all.len());
                    Ok(Some(Reply::Chunks {
                        chunks: all[start..end]
                            .iter()
                            .map(|c| WireChunk {
                                hash: c.hash.0,
                                size: c.len,
                            })
                            .collect(),
                        more: end < all.len(),
                    }))
                })
                .await
                .ok()
                .flatten();
            let msg = got.unwrap_or_else(|| Reply::Unavailable {
                reason: format!("no version {id} of that folder is kept here"),
            });
            reply(&mut send, &msg, None).await
        }
        // Vault requests went to the holder above.
        _ => Err(ServeError::Protocol("an unexpected request".into())),
    }
}

/// The newest versions of `all` that fit in one reply.
fn versions_reply(all: Vec<crate::index::HistoryVersion>) -> Reply {
    // Paths and link targets may be long: stay well under a frame.
    let budget = MAX_FRAME / 2;
    let total = all.len();
    let mut bytes = 0;
    let mut versions = Vec::new();
    for v in all {
        let w = WireVersion {
            id: v.id,
            path: v.path.as_str().to_owned(),
            kind: v.kind.to_wire(),
            size: v.size,
            mtime_ns: v.mtime_ns,
            permissions: v.permissions,
            hash: v.hash.map(|h| h.0),
            symlink_target: v.symlink_target,
            modified_by: v.modified_by.0,
            device: v.device.filter(|d| d.len() <= crate::protocol::MAX_NAME),
            superseded_at: v.superseded_at,
            reason: v.reason.as_str().to_owned(),
        };
        bytes += 128
            + w.path.len()
            + w.symlink_target.as_ref().map_or(0, String::len)
            + w.device.as_ref().map_or(0, String::len);
        if versions.len() == MAX_VERSIONS_PER_REPLY || bytes > budget {
            break;
        }
        versions.push(w);
    }
    Reply::History {
        truncated: versions.len() < total,
        versions,
    }
}

/// A chunk of a version kept of folder `row` (rooted at `root`), read from
/// the chunk store or the version's pending file and checked against `hash`.
pub(super) async fn history_chunk(
    engine: &Arc<Engine>,
    row: i64,
    root: std::path::PathBuf,
    hash: ChunkHash,
    size: u32,
) -> Option<Vec<u8>> {
    use crate::history::serve::{find_chunk, locate_chunk, read_chunk};
    let store =
        crate::history::store::ChunkStore::attach(&crate::history::store_dir(engine.home.root()));
    let index = engine.index.clone();
    tokio::task::spawn_blocking(move || {
        find_chunk(
            || index.with(|i| locate_chunk(i, row, &hash, size)),
            |found| read_chunk(&store, &root, found, &hash, size),
        )
    })
    .await
    .ok()
    .flatten()
}

pub(super) async fn reply(
    send: &mut SendStream,
    msg: &Reply,
    data: Option<Vec<u8>>,
) -> Result<(), ServeError> {
    let link = |e: &dyn std::fmt::Display| ServeError::Link(e.to_string());
    match data {
        // Handed over whole, frame and bytes: the stream keeps them as they
        // are instead of copying them into its buffer (a chunk is up to 1 MiB,
        // and serving a large file is bound by the sender's CPU).
        Some(d) => send
            .write_all_chunks(&mut [Bytes::from(encode(msg)), Bytes::from(d)])
            .await
            .map_err(|e| link(&e))?,
        None => write_msg(send, msg).await.map_err(|e| link(&e))?,
    }
    send.finish().map_err(|e| link(&e))?;
    Ok(())
}

/// Whether no directory between `root` and `rel` is a symlink.
fn no_symlink_parents(root: &std::path::Path, rel: &RelPath) -> bool {
    let mut dir = root.to_path_buf();
    let parts: Vec<&str> = rel.as_str().split('/').collect();
    parts[..parts.len() - 1].iter().all(|p| {
        dir.push(p);
        std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
    })
}

/// What the place a chunk request names gave.
struct Hinted {
    /// The chunk's bytes, vouched for or checked (`None`: not there).
    bytes: Option<Vec<u8>>,
    /// The stat of a large file with no chunk list kept for it.
    unlisted: Option<Stat>,
}

/// How far a read of the place a chunk request names may go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Only what can be done right on the async worker: the file's recorded
    /// chunk list vouches for the chunk (no hash needed) and its bytes are in
    /// the page cache (`preadv2` with `RWF_NOWAIT`: no wait on the disk).
    /// Handing every chunk of a large file to a blocking thread cost a wake-up
    /// and a context switch each way: about 0.25 s of the sender's CPU per GiB
    /// on loopback.
    Cached,
    /// Anything: on a blocking thread.
    Any,
}

/// Reads the chunk at `offset` of `rel` under `root` (no symlinked parents,
/// never following a symlink at the end). A large file whose list in `served`
/// has the chunk there, and whose stat did not change while it was read, gives
/// the bytes unhashed; any other bytes are checked against `hash`. With
/// [`Reach::Cached`], `None` unless the bytes came that first way from the
/// page cache.
#[allow(clippy::too_many_arguments)]
fn read_hinted(
    served: &Served,
    row: i64,
    root: &std::path::Path,
    rel: &RelPath,
    offset: u64,
    size: u32,
    hash: &ChunkHash,
    reach: Reach,
) -> Option<Hinted> {
    use std::os::unix::fs::OpenOptionsExt;
    let quick = reach == Reach::Cached;
    let path = rel.as_str();
    if (quick && !served.lists(row, path)) || !no_symlink_parents(root, rel) {
        return None;
    }
    let f: File = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(rel.to_fs(root))
        .ok()?;
    let before = Stat::of(&f.metadata().ok()?);
    let listed = (before.size() >= SERVED_MIN_SIZE)
        .then(|| served.vouches(row, path, before, offset, size, hash));
    if quick && listed != Some(Some(true)) {
        return None;
    }
    let unlisted = matches!(listed, Some(None)).then_some(before);
    let mut buf = vec![0u8; size as usize];
    if quick {
        if !crate::disk::read_cached_at(&f, &mut buf, offset).ok()? {
            return None;
        }
    } else {
        f.read_exact_at(&mut buf, offset).ok()?;
    }
    let vouched = listed == Some(Some(true)) && f.metadata().is_ok_and(|m| Stat::of(&m) == before);
    if quick && !vouched {
        return None;
    }
    let bytes = (vouched || blake3::hash(&buf).as_bytes() == &hash.0).then_some(buf);
    Some(Hinted { bytes, unlisted })
}

/// Keeps the chunk list of `path` in folder `row` in `served`, if the index
/// recorded it for the file as it is now (`stat`, read before the list: a scan
/// committing between the two reads leaves a stat that no longer matches,
/// never a list for the wrong content). One request at a time reads a file's
/// list; the others go on by hash.
async fn keep_list(engine: &Arc<Engine>, row: i64, path: &str, stat: Stat) {
    let Some(_loading) = engine.served.load(row, path) else {
        return;
    };
    let Ok(rel) = RelPath::new(path) else { return };
    let (p, e) = (path.to_owned(), engine.clone());
    let _ = engine
        .index
        .run(move |i| -> Result<(), IndexError> {
            let Some(f) = i.local_file(row, &rel)? else {
                return Ok(());
            };
            if !f.record.deleted && Stat::recorded(&f.meta) == stat {
                e.served.keep(row, &p, stat, &i.file_chunks(row, &rel)?);
            }
            Ok(())
        })
        .await;
}

/// Reads `size` bytes at `offset` of `path` (never following a symlink at the
/// last component) and returns them if they hash to `hash`.
pub fn read_verified(
    path: &std::path::Path,
    offset: u64,
    size: u32,
    hash: &ChunkHash,
) -> Option<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f: File = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let mut buf = vec![0u8; size as usize];
    f.read_exact_at(&mut buf, offset).ok()?;
    (blake3::hash(&buf).as_bytes() == &hash.0).then_some(buf)
}

/// [`request`] with `body` sent right after the request frame, and a time
/// limit on the whole exchange up to the reply frame.
pub(super) async fn request_with(
    conn: &Connection,
    req: &Request,
    body: Option<&[u8]>,
) -> Result<(Reply, RecvStream), FetchError> {
    let exchange = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| FetchError::Link(e.to_string()))?;
        write_msg(&mut send, req).await?;
        if let Some(b) = body {
            tokio::io::AsyncWriteExt::write_all(&mut send, b)
                .await
                .map_err(|e| FetchError::Link(e.to_string()))?;
        }
        send.finish().map_err(|e| FetchError::Link(e.to_string()))?;
        match read_msg::<Reply>(&mut recv).await? {
            Some(r) => Ok((r, recv)),
            None => Err(FetchError::Link("the peer closed the request".into())),
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| FetchError::Link("request timed out".into()))?
}

/// Sends `req` on a new bi-stream and reads the reply frame (what follows it,
/// such as chunk bytes, stays in the stream).
pub(super) async fn request(
    conn: &Connection,
    req: &Request,
) -> Result<(Reply, RecvStream), FetchError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| FetchError::Link(e.to_string()))?;
    write_msg(&mut send, req).await?;
    send.finish().map_err(|e| FetchError::Link(e.to_string()))?;
    match read_msg::<Reply>(&mut recv).await? {
        Some(r) => Ok((r, recv)),
        None => Err(FetchError::Link("the peer closed the request".into())),
    }
}

/// Fetches one chunk and checks it against its hash.
pub async fn fetch_chunk(
    conn: &Connection,
    folder: &str,
    path: &RelPath,
    offset: u64,
    size: u32,
    hash: &ChunkHash,
) -> Result<Vec<u8>, FetchError> {
    let req = Request::Chunk {
        folder: folder.to_owned(),
        path: path.as_str().to_owned(),
        offset,
        size,
        hash: hash.0,
    };
    let (reply, mut recv) = tokio::time::timeout(REQUEST_TIMEOUT, request(conn, &req))
        .await
        .map_err(|_| FetchError::Link("request timed out".into()))??;
    match reply {
        Reply::Chunk { size: n } if n == size => {
            let mut buf = vec![0u8; size as usize];
            tokio::time::timeout(
                REQUEST_TIMEOUT,
                tokio::io::AsyncReadExt::read_exact(&mut recv, &mut buf),
            )
            .await
            .map_err(|_| FetchError::Link("chunk timed out".into()))?
            .map_err(|e| FetchError::Link(e.to_string()))?;
            if blake3::hash(&buf).as_bytes() != &hash.0 {
                return Err(FetchError::Corrupt);
            }
            Ok(buf)
        }
        Reply::Unavailable { reason } => Err(FetchError::Unavailable(reason)),
        other => Err(FetchError::Protocol(ProtocolError::Malformed(format!(
            "unexpected reply {other:?}"
        )))),
    }
}

/// Fetches the chunk entries of some groups of a file version.
pub async fn fetch_groups(
    conn: &Connection,
    folder: &str,
    path: &RelPath,
    file_hash: &FileHash,
    groups: &[u32],
) -> Result<Vec<Vec<WireChunk>>, FetchError> {
    let mut out = Vec::with_capacity(groups.len());
    for part in groups.chunks(MAX_GROUPS_PER_REQUEST) {
        let req = Request::Groups {
            folder: folder.to_owned(),
            path: path.as_str().to_owned(),
            file_hash: file_hash.0,
            groups: part.to_vec(),
        };
        let (reply, _) = tokio::time::timeout(REQUEST_TIMEOUT, request(conn, &req))
            .await
            .map_err(|_| FetchError::Link("request timed out".into()))??;
        match reply {
            Reply::Groups { groups } if groups.len() == part.len() => out.extend(groups),
            Reply::Unavailable { reason } => return Err(FetchError::Unavailable(reason)),
            other => {
                return Err(FetchError::Protocol(ProtocolError::Malformed(format!(
                    "unexpected reply {other:?}"
                ))));
            }
        }
    }
    Ok(out)
}
