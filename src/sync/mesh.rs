//! History across the mesh, the asking side: which versions the connected
//! peers keep of a path (each device's own backups of what it replaced), and
//! fetching one of them from the peer that holds it, every chunk and the whole
//! file checked against their hashes, into a temp file that the caller moves
//! into place. The serving side is in [`super::link`].

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use iroh::endpoint::Connection;

use super::Engine;
use super::link::{FetchError, fetch_chunk};
use crate::chunking::{ChunkHash, FileHash};
use crate::device::DeviceId;
use crate::history::restore::{Fetched, temp_path};
use crate::index::FileKind;
use crate::protocol::{ProtocolError, Reply, Request, WireChunk, WireVersion};
use crate::relpath::RelPath;

/// How long a peer may take to list its versions.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request of a fetch may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Chunks fetched at once.
const IN_FLIGHT: usize = 8;

/// The versions one peer keeps of a path.
#[derive(Debug, Clone)]
pub struct PeerVersions {
    /// The peer.
    pub device: DeviceId,
    /// Its name here.
    pub name: String,
    /// Newest first.
    pub versions: Vec<WireVersion>,
    /// It keeps more than it could send.
    pub truncated: bool,
}

/// A peer that could not list its versions.
#[derive(Debug, Clone)]
pub struct PeerFailure {
    /// The peer.
    pub device: DeviceId,
    /// Its name here.
    pub name: String,
    /// What went wrong.
    pub error: String,
}

/// What the connected peers sharing a folder keep of a path.
#[derive(Debug, Clone, Default)]
pub struct MeshHistory {
    /// The peers that answered.
    pub peers: Vec<PeerVersions>,
    /// The peers that did not.
    pub errors: Vec<PeerFailure>,
}

/// Why a peer's version could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// No link to the peer now.
    #[error(
        "{0} is not connected (see `ferry devices`); a version it keeps can be fetched only while it is"
    )]
    NotConnected(String),
    /// The folder is not synced with the peer.
    #[error("folder {folder} is not synced with {device}")]
    NotShared {
        /// The folder id.
        folder: String,
        /// The peer.
        device: String,
    },
    /// The peer keeps no such version of the path.
    #[error("{device} keeps no version {id} of {path} (see `ferry history {path}`)")]
    UnknownVersion {
        /// The peer.
        device: String,
        /// The version asked for.
        id: i64,
        /// `FOLDER:PATH`.
        path: String,
    },
    /// The peer sent bytes or a chunk list that do not match the version.
    #[error(
        "{device} sent data for version {id} that does not match its hash ({detail}); nothing was written"
    )]
    Mismatch {
        /// The peer.
        device: String,
        /// The version.
        id: i64,
        /// What did not match.
        detail: String,
    },
    /// The version cannot be restored (a directory).
    #[error("{0}")]
    Refused(String),
    /// A request to the peer failed.
    #[error("fetching version {id} from {device} failed: {source}")]
    Fetch {
        /// The peer.
        device: String,
        /// The version.
        id: i64,
        /// Why.
        source: FetchError,
    },
    /// Writing the temp file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Where.
        path: PathBuf,
        /// What happened.
        source: std::io::Error,
    },
}

impl Engine {
    /// Asks every connected peer that syncs `folder` for the versions it keeps
    /// of `path` (and below it; the whole folder when `None`), all at once,
    /// each within a timeout. A peer that fails is listed, not fatal.
    pub async fn peer_history(&self, folder: &str, path: Option<&RelPath>) -> MeshHistory {
        let peers: Vec<(DeviceId, Connection)> = self
            .links
            .lock()
            .expect("links lock")
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .map(|(d, c)| (*d, c.clone()))
            .collect();
        let mut asks = tokio::task::JoinSet::new();
        for (device, conn) in peers {
            if !self
                .synced_with(device)
                .await
                .iter()
                .any(|f| f.id.as_str() == folder)
            {
                continue;
            }
            let name = self.device_label(device).await;
            let req = Request::History {
                folder: folder.to_owned(),
                path: path.map_or_else(String::new, |p| p.as_str().to_owned()),
            };
            asks.spawn(async move {
                let got = match tokio::time::timeout(LIST_TIMEOUT, ask(&conn, &req)).await {
                    Ok(Ok(Reply::History {
                        versions,
                        truncated,
                    })) => Ok((versions, truncated)),
                    Ok(Ok(Reply::Unavailable { reason })) => Err(reason),
                    Ok(Ok(other)) => Err(format!("unexpected reply {other:?}")),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no answer in time".to_owned()),
                };
                (device, name, got)
            });
        }
        let mut out = MeshHistory::default();
        while let Some(done) = asks.join_next().await {
            let Ok((device, name, got)) = done else {
                continue;
            };
            match got {
                Ok((mut versions, truncated)) => {
                    // What a peer sends is shown and used: drop what is unsafe.
                    versions.retain(|v| RelPath::new(&v.path).is_ok());
                    out.peers.push(PeerVersions {
                        device,
                        name,
                        versions,
                        truncated,
                    });
                }
                Err(error) => out.errors.push(PeerFailure {
                    device,
                    name,
                    error,
                }),
            }
        }
        out.peers.sort_by(|a, b| a.name.cmp(&b.name));
        out.errors.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Fetches version `id` of `path` from `peer` into a new temp file in
    /// `dir`: its chunk list, then its chunks (several at once), each checked
    /// against its hash, then the whole file against the version's hash; with
    /// its permissions and mtime, fsynced. The temp file is removed unless the
    /// caller moves it away.
    pub async fn fetch_peer_version(
        &self,
        folder: &str,
        path: &RelPath,
        peer: DeviceId,
        id: i64,
        dir: &Path,
    ) -> Result<Fetched, MeshError> {
        let label = self.device_label(peer).await;
        let conn = self
            .link(&peer)
            .ok_or_else(|| MeshError::NotConnected(label.clone()))?;
        if !self
            .synced_with(peer)
            .await
            .iter()
            .any(|f| f.id.as_str() == folder)
        {
            return Err(MeshError::NotShared {
                folder: folder.to_owned(),
                device: label,
            });
        }
        let fetch_err = |source| MeshError::Fetch {
            device: label.clone(),
            id,
            source,
        };
        let mismatch = |detail: &str| MeshError::Mismatch {
            device: label.clone(),
            id,
            detail: detail.to_owned(),
        };
        let listed = ask_within(
            &conn,
            &Request::History {
                folder: folder.to_owned(),
                path: path.as_str().to_owned(),
            },
        )
        .await
        .map_err(fetch_err)?;
        let v = match listed {
            Reply::History { versions, .. } => versions
                .into_iter()
                .find(|v| v.id == id && v.path == path.as_str()),
            Reply::Unavailable { reason } => {
                return Err(fetch_err(FetchError::Unavailable(reason)));
            }
            other => return Err(fetch_err(unexpected(&other))),
        };
        let Some(v) = v else {
            return Err(MeshError::UnknownVersion {
                device: label,
                id,
                path: format!("{folder}:{path}"),
            });
        };
        let kind = FileKind::from_wire(v.kind).ok_or_else(|| mismatch("an unknown kind"))?;
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let guard = TempFile(temp_path(dir));
        let tmp = guard.0.clone();
        match kind {
            FileKind::Dir => {
                return Err(MeshError::Refused(format!(
                    "version {id} of {folder}:{path} on {label} is a directory: it has no content to restore"
                )));
            }
            FileKind::Symlink => {
                let target = v
                    .symlink_target
                    .clone()
                    .ok_or_else(|| mismatch("a link without a target"))?;
                std::os::unix::fs::symlink(&target, &tmp).map_err(io_at(&tmp))?;
            }
            FileKind::File => {
                let hash = v.hash.ok_or_else(|| mismatch("a file without a hash"))?;
                let chunks = self
                    .version_chunks(&conn, folder, id, v.size)
                    .await
                    .map_err(|e| match e {
                        Listing::Fetch(e) => fetch_err(e),
                        Listing::Bad(d) => mismatch(&d),
                    })?;
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io_at(&tmp))?;
                let file = std::sync::Arc::new(file);
                fetch_into(&conn, folder, path, &chunks, &file)
                    .await
                    .map_err(|e| match e {
                        FetchError::Corrupt => mismatch("a chunk"),
                        e => fetch_err(e),
                    })?;
                let (t, perms, mtime) = (tmp.clone(), v.permissions, v.mtime_ns);
                let whole =
                    tokio::task::spawn_blocking(move || finish_file(&t, &file, perms, mtime))
                        .await
                        .map_err(|e| io_at(&tmp)(std::io::Error::other(e.to_string())))?
                        .map_err(io_at(&tmp))?;
                if whole != hash {
                    return Err(mismatch("the whole file"));
                }
            }
        }
        Ok(Fetched {
            tmp: guard.keep(),
            kind,
            hash: v.hash.map(FileHash),
            symlink_target: v.symlink_target,
            size: v.size,
            version: id,
        })
    }

    /// A device's name here, or its id.
    pub async fn device_label(&self, device: DeviceId) -> String {
        self.index
            .run(move |i| i.peer(&device))
            .await
            .ok()
            .flatten()
            .map_or_else(|| device.to_string(), |p| p.name)
    }

    /// A version's whole chunk list, page by page, checked to cover `size`
    /// bytes exactly.
    async fn version_chunks(
        &self,
        conn: &Connection,
        folder: &str,
        id: i64,
        size: u64,
    ) -> Result<Vec<WireChunk>, Listing> {
        let mut chunks: Vec<WireChunk> = Vec::new();
        let mut total = 0u64;
        loop {
            let req = Request::VersionChunks {
                folder: folder.to_owned(),
                id,
                start: u32::try_from(chunks.len())
                    .map_err(|_| Listing::Bad("a chunk list too long".into()))?,
            };
            match ask_within(conn, &req).await.map_err(Listing::Fetch)? {
                Reply::Chunks { chunks: page, more } => {
                    total += page.iter().map(|c| u64::from(c.size)).sum::<u64>();
                    if total > size || (more && page.is_empty()) {
                        return Err(Listing::Bad("its chunk list".into()));
                    }
                    chunks.extend(page);
                    if !more {
                        break;
                    }
                }
                Reply::Unavailable { reason } => {
                    return Err(Listing::Fetch(FetchError::Unavailable(reason)));
                }
                other => return Err(Listing::Fetch(unexpected(&other))),
            }
        }
        if total != size {
            return Err(Listing::Bad("its chunk list".into()));
        }
        Ok(chunks)
    }
}

enum Listing {
    Fetch(FetchError),
    Bad(String),
}

/// Fetches `chunks` (a version of `path`) and writes each at its offset.
async fn fetch_into(
    conn: &Connection,
    folder: &str,
    path: &RelPath,
    chunks: &[WireChunk],
    file: &std::sync::Arc<File>,
) -> Result<(), FetchError> {
    let mut offsets = Vec::with_capacity(chunks.len());
    let mut at = 0u64;
    for c in chunks {
        offsets.push(at);
        at += u64::from(c.size);
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    loop {
        while next < chunks.len() && tasks.len() < IN_FLIGHT {
            let (c, offset) = (chunks[next], offsets[next]);
            let (conn, folder, path, file) =
                (conn.clone(), folder.to_owned(), path.clone(), file.clone());
            tasks.spawn(async move {
                let hash = ChunkHash(c.hash);
                let data = fetch_chunk(&conn, &folder, &path, offset, c.size, &hash).await?;
                tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
                    .await
                    .map_err(|e| FetchError::Link(e.to_string()))?
                    .map_err(|e| FetchError::Link(format!("writing the temp file: {e}")))
            });
            next += 1;
        }
        match tasks.join_next().await {
            None => return Ok(()),
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => return Err(e),
            Some(Err(e)) => return Err(FetchError::Link(e.to_string())),
        }
    }
}

/// Hashes what was written, sets permissions and mtime, and fsyncs.
fn finish_file(
    path: &Path,
    file: &File,
    permissions: u32,
    mtime_ns: i64,
) -> std::io::Result<[u8; 32]> {
    let hash = crate::disk::hash_file(path, file.metadata()?.len())?;
    fs::set_permissions(path, fs::Permissions::from_mode(permissions & 0o7777))?;
    file.set_modified(crate::disk::system_time(mtime_ns))?;
    file.sync_all()?;
    Ok(*hash.as_bytes())
}

/// One request and its reply frame.
async fn ask(conn: &Connection, req: &Request) -> Result<Reply, FetchError> {
    Ok(super::link::request(conn, req).await?.0)
}

async fn ask_within(conn: &Connection, req: &Request) -> Result<Reply, FetchError> {
    tokio::time::timeout(REQUEST_TIMEOUT, ask(conn, req))
        .await
        .map_err(|_| FetchError::Link("request timed out".into()))?
}

fn unexpected(reply: &Reply) -> FetchError {
    let mut what = format!("{reply:?}");
    what.truncate(120);
    FetchError::Protocol(ProtocolError::Malformed(format!("unexpected reply {what}")))
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> MeshError + '_ {
    move |source| MeshError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A temp file removed on drop unless kept.
struct TempFile(PathBuf);

impl TempFile {
    fn keep(self) -> PathBuf {
        let p = self.0.clone();
        std::mem::forget(self);
        p
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
