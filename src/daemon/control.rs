//! The local control API: how the CLI talks to the running agent.
//!
//! A Unix socket `agent.sock` in the device home (mode 0600, so only the
//! home's owner can use it; never reachable from the network). One request per
//! connection: the client writes one JSON object and a newline, the agent
//! answers with one JSON object and a newline and closes.
//!
//! Requests (`cmd` selects; other fields are its arguments):
//! - `{"cmd":"status"}` → `{pid, device_id, name, addresses, relay,
//!   refused_links, config_restart_needed, folders}` (`refused_links`: sync links refused from unpaired
//!   devices; `folders`: per folder id `{state, error, need_items, need_bytes,
//!   need: [{path, size, reason}]}`)
//! - `{"cmd":"invite","folder":ID|null,"expires_secs":N}` → `{code, expires_at}`
//! - `{"cmd":"join","code":CODE,"into":PATH|null,"name":NAME|null,
//!   "folder_type":TYPE|null}` →
//!   `{device, name, folder: {id,label}|null, folder_path: PATH|null}`
//! - `{"cmd":"devices"}` → `[{id, name, connected, address, direct,
//!   connected_since, last_seen_at, bytes_in, bytes_out, last_error,
//!   chunk_bytes_in, chunk_bytes_out, bad_chunks, bad_records,
//!   bad_requests, stalled_requests}]`
//! - `{"cmd":"remove-device","id":ID}` → `{removed: ID}`
//! - `{"cmd":"share","folder":ID,"device":ID}` → `{folder, device}`
//! - `{"cmd":"confirm-deletes","folder":ID}` → `{deleted: N}`
//! - `{"cmd":"revert","folder":ID}` → `{reverting: ID}` (receive-only folders)
//! - `{"cmd":"reload"}` → `{reloaded: true}` (the CLI sends it after changing
//!   folders, so the agent picks them up at once instead of within 5 s)
//! - `{"cmd":"reload-config"}` → `{applied: [KEY], restart_needed: [KEY]}`:
//!   reads `config.toml` again (refused, changing nothing, if it does not
//!   validate) and takes on at once the settings it can (`scan.*`, `sync.*`,
//!   `history.*`: the next scan, pull pass and prune use them, and the folder
//!   watchers restart with a new debounce); `restart_needed` lists the settings
//!   that differ from what the agent runs with and take effect only when it
//!   restarts (`device.*`, `database.*`, `network.*`). `status` repeats the
//!   latter as `config_restart_needed`.
//! - `{"cmd":"restore","folder":ID,"path":REL|null,"version":N|null,
//!   "at":UNIX_SECS|null,"recursive":BOOL}` → `{restored: [{path, version,
//!   size, kept, written_to}], unchanged: [PATH], left: [{path, reason}]}`:
//!   restores in place (the newest version, version N of `path`, or what was
//!   current at `at`; with `recursive`, the tree at or below `path`, the whole
//!   folder when `path` is null, as it was at `at`). Each version replaced is
//!   kept in the history first (`kept`: its id); the agent scans before and
//!   after, so the restore syncs as a local change. `version` is `null` for a
//!   path restored from the current file.
//! - `{"cmd":"resolve","folder":ID,"path":REL,"keep":"local"|"remote"|"both"|N}`
//!   → `{conflict, path, conflict_path, copy_removed, kept: [ID], resolution}`:
//!   resolves the newest open conflict whose path or conflict copy is `path`
//!   (`N`: a history id restored at the path).
//! - `{"cmd":"history","folder":ID,"path":REL|null}` → `{folder, path,
//!   versions: [{id, path, kind, size, mtime_ns, permissions, hash,
//!   symlink_target, modified_by, device, superseded_at, reason,
//!   device_holding, device_holding_name}], truncated: [DEVICE-ID], errors:
//!   [{device, name, error}]}`: the versions the connected peers that sync the
//!   folder keep of `path` (and below it; the whole folder when null), newest
//!   first; `id` is the holder's. Peers are asked at once, each within 10 s; one
//!   that fails is listed in `errors`. `truncated`: peers that keep more than
//!   they sent.
//! - `{"cmd":"restore-remote","folder":ID,"path":REL,"device":ID|NAME,
//!   "version":N,"to":PATH|null,"force":BOOL}` → `{device, device_name,
//!   restored: [{path, version, size, kept, written_to}], unchanged: [PATH],
//!   left: []}`: fetches version N (the holder's id) of `path` from that
//!   connected peer, every chunk and the whole file hash-checked, and writes
//!   it in place like `restore` (the version it replaces kept, then a scan so
//!   it syncs) or to `to` (refused if it exists, unless `force`).
//!
//! Answers: `{"ok":true,"result":…}` or `{"ok":false,"error":"one line"}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The socket's file name in the home.
pub const SOCKET_FILE: &str = "agent.sock";
/// Largest request or answer accepted, in bytes.
pub const MAX_MESSAGE: u64 = 1 << 20;

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// The agent's own state.
    Status,
    /// Make a one-time invite code.
    Invite {
        /// A folder to share with whoever joins.
        folder: Option<String>,
        /// The joiner holds the folder as an encrypted backup.
        #[serde(default)]
        encrypted: bool,
        /// How long the code is valid.
        expires_secs: u64,
    },
    /// Pair with the device that made `code`.
    Join {
        /// The invite code.
        code: String,
        /// Where to put the folder the invite shares.
        into: Option<PathBuf>,
        /// A local name for the inviting device.
        name: Option<String>,
        /// The shared folder's type here (send-receive when absent).
        #[serde(default)]
        folder_type: Option<String>,
    },
    /// The paired devices and their links.
    Devices,
    /// Folders were added, accepted or removed: pick them up now.
    Reload,
    /// `config.toml` changed: take on what can change while running.
    ReloadConfig,
    /// Undo local changes in a receive-only folder.
    Revert {
        /// The folder id.
        folder: String,
    },
    /// Record the deletes a scan held back, and send them.
    ConfirmDeletes {
        /// The folder id.
        folder: String,
    },
    /// Unpair a device.
    RemoveDevice {
        /// Its id.
        id: String,
    },
    /// Restore versions in place.
    Restore {
        /// The folder id.
        folder: String,
        /// The path in the folder (`None`: the folder root, with `recursive`).
        path: Option<String>,
        /// A history id to restore.
        #[serde(default)]
        version: Option<i64>,
        /// Restore what was current at this time (Unix seconds).
        #[serde(default)]
        at: Option<i64>,
        /// Restore the tree at or below `path` as it was at `at`.
        #[serde(default)]
        recursive: bool,
    },
    /// Resolve an open conflict.
    Resolve {
        /// The folder id.
        folder: String,
        /// The path or its conflict copy.
        path: String,
        /// `local`, `remote`, `both` or a history id.
        keep: String,
    },
    /// The versions connected peers keep of a path.
    History {
        /// The folder id.
        folder: String,
        /// The path in the folder (`None`: the whole folder).
        #[serde(default)]
        path: Option<String>,
    },
    /// Restore a version a peer keeps.
    RestoreRemote {
        /// The folder id.
        folder: String,
        /// The path in the folder.
        path: String,
        /// The peer holding the version: its id or its name.
        device: String,
        /// The version's history id on that peer.
        version: i64,
        /// Write it here instead of in place.
        #[serde(default)]
        to: Option<PathBuf>,
        /// Replace `to` if it exists.
        #[serde(default)]
        force: bool,
    },
    /// Offer a folder to a paired device.
    Share {
        /// The folder id.
        folder: String,
        /// The device id.
        device: String,
        /// The device holds it as an encrypted backup.
        #[serde(default)]
        encrypted: bool,
    },
    /// Rebuild a folder from a backup holder.
    Recover {
        /// The holder: its id or name (already paired).
        from: String,
        /// The folder's recovery code.
        key: String,
        /// Where to put the folder (missing or empty).
        into: PathBuf,
        /// As it was at this time (Unix seconds), rather than now.
        #[serde(default)]
        at: Option<i64>,
    },
}

/// The agent's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Success?
    pub ok: bool,
    /// The result, when ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a request could not be made or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No agent listens on this home.
    #[error("the ferry agent is not running for home {0} (start it with `ferry daemon`)")]
    NotRunning(PathBuf),
    /// The agent answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The socket failed mid-request.
    #[error("talking to the agent failed: {0}")]
    Io(#[from] std::io::Error),
    /// The agent's answer is not what this CLI expects (a different version?).
    #[error("the agent sent an answer this ferry does not understand: {0}")]
    BadAnswer(String),
}

/// The socket path of a home.
pub fn socket_path(home: &Path) -> PathBuf {
    home.join(SOCKET_FILE)
}

/// Sends one request to the agent of `home` and returns its result.
pub fn call(home: &Path, req: &Request, timeout: Duration) -> Result<Value, ControlError> {
    let path = socket_path(home);
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NotRunning(home.to_owned()));
        }
        Err(e) => return Err(e.into()),
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).expect("requests serialize");
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(&stream, MAX_MESSAGE)).read_line(&mut answer)?;
    let resp: Response =
        serde_json::from_str(&answer).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    if resp.ok {
        Ok(resp.result.unwrap_or(Value::Null))
    } else {
        Err(ControlError::Refused(
            resp.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}
