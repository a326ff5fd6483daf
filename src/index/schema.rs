//! The database schema, in numbered migrations applied in order on open.
//!
//! This is the one place the schema is written down. `PRAGMA user_version` holds
//! the number of migrations applied; `PRAGMA application_id` is [`APPLICATION_ID`]
//! so that ferry never mistakes another program's SQLite file for its own. A
//! migration is never edited once released: change the schema by appending one,
//! and extend the test that opens a database of the previous version.
//!
//! Conventions:
//! - times are Unix seconds (`*_at`) or nanoseconds (`mtime_ns`), as INTEGER;
//! - paths inside folders are `RelPath` strings (`/`-separated, validated);
//! - hashes are 32-byte BLOBs (blake3); `inode` and `dev` are u64 stored bit for
//!   bit as INTEGER;
//! - `version` columns are version vectors encoded as 16 bytes per entry
//!   (device short id, counter; both big-endian u64), sorted by device;
//! - `kind` is 0 file, 1 directory, 2 symlink;
//! - `devices.addresses` is a JSON array of socket addresses (last known);
//! - `files.sequence` is the folder's local sequence number at the file's last
//!   change, so "everything changed since N" is an index range scan;
//! - `remote_files.groups` is a file's chunk list in groups (see `protocol`), 44
//!   bytes per group: hash, chunk count (u32 BE), size (u64 BE);
//! - `remote_index` holds, per folder and peer, the peer's index epoch and the
//!   highest sequence of its records stored, which the hello sends back.
//! - `store_packs.name` is a pack's random id (32 lowercase hex characters);
//!   its file is `<home>/store/packs/<first 2 characters>/<name>.pack`, laid out
//!   as `history::store` documents. A pack row (and its `store_chunks` rows) is
//!   committed only once the file is complete, fsynced and in place;
//! - `store_chunks` says where each chunk of the history is stored, once however
//!   many versions share it: `offset` is the byte offset of the chunk's entry
//!   (its 36-byte entry header) in the pack, `length` the chunk's data bytes. A
//!   chunk is live while some `history_chunks.hash` names it (or, in a folder
//!   with `history.local`, a live file's chunk list does: its version is stored
//!   as it is seen);
//! - `history.stored` is 0 while a replaced file's bytes are still the whole
//!   file `<folder>/.ferry/versions/<history id>` (a rename, so pulls stay fast)
//!   and 1 once they are in the chunk store (or the version has no bytes);
//! - `conflicts.local_won` is 1 when this device's version stayed at `path`, 0
//!   when it became the copy at `conflict_path`.
//! - `history.reserved` is 1 while a pull has kept a row for the version it is
//!   about to replace but has not yet committed the replacement: the row is
//!   committed before anything moves (so a kill after the rename cannot lose the
//!   version's only record) and is not a version yet. Listings, retention,
//!   verification and serving skip such rows. The pull's own commit sets it to
//!   0; a row left reserved by a killed pull is settled by the history ingest
//!   (kept if the version left its path, e.g. its file is under
//!   `.ferry/versions/<id>`, dropped if it never did), or reused when the pull
//!   is retried.
//! - `folder_secrets.secret` is the folder's 32-byte vault secret (see
//!   `vault::keys`), from which the keys that seal its chunks and records for
//!   an untrusted holder are derived. One row per folder, written when the
//!   folder is added (migration 9 gives existing folders a random one). Every
//!   device of a folder must hold the same secret; the index file is kept
//!   private to the user (mode 0600) for this reason.
//! - `folder_offers.encrypted` is 1 for a folder offered to this device as an
//!   encrypted backup holder (accepting it makes a vault, not a folder);
//!   `folder_offers.secret` is the folder's vault secret a trusted device
//!   offered with it (taken when the offer is accepted; never for encrypted
//!   offers).
//! - `vault_holders` lists, per folder of this device, the devices that hold
//!   it encrypted; `pushed` is the highest local sequence number whose records
//!   the holder has acknowledged, `history` the highest history row id whose
//!   version it has, and `revision` the last record revision used (records
//!   are sealed with increasing revisions, see `vault`).
//! - `vaults` are the folders this device holds for others, sealed: the folder
//!   id, the device that shared it (`owner`, the only one that may write), and
//!   the owner's label. `vault_records` holds the sealed records as the owner
//!   sent them, under their keyed ids; `vault_stored` lists the sealed chunks
//!   (keyed id `chunk`) and where their bytes are: `hash` is the blake3 hash of
//!   the sealed bytes, their key in the chunk store (`store_chunks`), `length`
//!   their size. This device can read neither. A store chunk is live while a
//!   `vault_stored` row names it, as for `history_chunks`. `vault_chunks` held
//!   sealed chunks as blobs before migration 12; the agent moves any it still
//!   has into the store at start, so it is empty after.
//! - `vault_sent_versions` lists, per folder and holder, the history versions
//!   (`version`: the `history.id` here, which may since have been pruned) sent
//!   to the holder and the keyed id of the sealed record they went under, so
//!   that versions this device prunes are dropped from the holder too.

/// `PRAGMA application_id` of a ferry index: "FRRY".
pub const APPLICATION_ID: i32 = 0x4652_5259;

/// The migrations; `MIGRATIONS[n]` takes a database from version `n` to `n + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: devices, folders, files and their chunks.
    r#"
CREATE TABLE devices (
    id           INTEGER PRIMARY KEY,
    device_id    TEXT    NOT NULL UNIQUE,
    short_id     INTEGER NOT NULL,
    name         TEXT    NOT NULL,
    is_local     INTEGER NOT NULL DEFAULT 0 CHECK (is_local IN (0, 1)),
    addresses    TEXT    NOT NULL DEFAULT '[]',
    added_at     INTEGER NOT NULL,
    last_seen_at INTEGER
);
CREATE UNIQUE INDEX devices_one_local ON devices(is_local) WHERE is_local = 1;

CREATE TABLE folders (
    id           INTEGER PRIMARY KEY,
    folder_id    TEXT    NOT NULL UNIQUE,
    label        TEXT    NOT NULL,
    path         TEXT    NOT NULL UNIQUE,
    folder_type  TEXT    NOT NULL
                 CHECK (folder_type IN ('send-receive', 'send-only', 'receive-only')),
    sequence     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    last_scan_at INTEGER,
    created_at   INTEGER NOT NULL
);

CREATE TABLE files (
    id             INTEGER PRIMARY KEY,
    folder         INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    path           TEXT    NOT NULL,
    kind           INTEGER NOT NULL CHECK (kind IN (0, 1, 2)),
    size           INTEGER NOT NULL,
    mtime_ns       INTEGER NOT NULL,
    permissions    INTEGER NOT NULL,
    inode          INTEGER NOT NULL DEFAULT 0,
    dev            INTEGER NOT NULL DEFAULT 0,
    hash           BLOB,
    symlink_target TEXT,
    deleted        INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)),
    sequence       INTEGER NOT NULL,
    version        BLOB    NOT NULL,
    modified_by    INTEGER NOT NULL,
    UNIQUE (folder, path)
);
CREATE INDEX files_by_sequence ON files(folder, sequence);
CREATE INDEX files_by_hash ON files(hash) WHERE hash IS NOT NULL;

CREATE TABLE chunks (
    file   INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    idx    INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    size   INTEGER NOT NULL,
    hash   BLOB    NOT NULL,
    PRIMARY KEY (file, idx)
) WITHOUT ROWID;
CREATE INDEX chunks_by_hash ON chunks(hash);
"#,
    // 2: the history of earlier versions (each device's own backups) and conflicts.
    r#"
CREATE TABLE history (
    id             INTEGER PRIMARY KEY,
    folder         INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    path           TEXT    NOT NULL,
    kind           INTEGER NOT NULL CHECK (kind IN (0, 1, 2)),
    size           INTEGER NOT NULL,
    mtime_ns       INTEGER NOT NULL,
    permissions    INTEGER NOT NULL,
    hash           BLOB,
    symlink_target TEXT,
    version        BLOB    NOT NULL,
    modified_by    INTEGER NOT NULL,
    superseded_at  INTEGER NOT NULL,
    reason         TEXT    NOT NULL
                   CHECK (reason IN ('replaced', 'deleted', 'conflict', 'restored-over', 'local'))
);
CREATE INDEX history_by_path ON history(folder, path, superseded_at);
CREATE INDEX history_by_time ON history(folder, superseded_at);

CREATE TABLE history_chunks (
    version INTEGER NOT NULL REFERENCES history(id) ON DELETE CASCADE,
    idx     INTEGER NOT NULL,
    offset  INTEGER NOT NULL,
    size    INTEGER NOT NULL,
    hash    BLOB    NOT NULL,
    PRIMARY KEY (version, idx)
) WITHOUT ROWID;
CREATE INDEX history_chunks_by_hash ON history_chunks(hash);

CREATE TABLE conflicts (
    id             INTEGER PRIMARY KEY,
    folder         INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    path           TEXT    NOT NULL,
    conflict_path  TEXT    NOT NULL,
    local_version  BLOB    NOT NULL,
    remote_version BLOB    NOT NULL,
    remote_device  TEXT    NOT NULL,
    detected_at    INTEGER NOT NULL,
    resolved_at    INTEGER,
    resolution     TEXT
);
CREATE INDEX conflicts_unresolved ON conflicts(folder, resolved_at);
"#,
    // 3: which folders are shared with which devices, and folders offered to us.
    r#"
CREATE TABLE folder_devices (
    folder INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    device INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    PRIMARY KEY (folder, device)
) WITHOUT ROWID;
CREATE INDEX folder_devices_by_device ON folder_devices(device);

CREATE TABLE folder_offers (
    id         INTEGER PRIMARY KEY,
    device     INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    folder_id  TEXT    NOT NULL,
    label      TEXT    NOT NULL,
    offered_at INTEGER NOT NULL,
    declined   INTEGER NOT NULL DEFAULT 0 CHECK (declined IN (0, 1)),
    UNIQUE (device, folder_id)
);
"#,
    // 4: the sync engine. Each folder's index epoch (random; a rebuilt index gets
    // a new one so peers start over), the records peers announced, and how far
    // each peer's index of each folder has been received.
    r#"
ALTER TABLE folders ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
UPDATE folders SET epoch = (abs(random()) % 9007199254740000) + 1;

CREATE TABLE remote_files (
    folder         INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    device         INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    path           TEXT    NOT NULL,
    kind           INTEGER NOT NULL CHECK (kind IN (0, 1, 2)),
    size           INTEGER NOT NULL,
    mtime_ns       INTEGER NOT NULL,
    permissions    INTEGER NOT NULL,
    hash           BLOB,
    symlink_target TEXT,
    deleted        INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    version        BLOB    NOT NULL,
    modified_by    INTEGER NOT NULL,
    sequence       INTEGER NOT NULL,
    groups         BLOB    NOT NULL,
    PRIMARY KEY (folder, device, path)
) WITHOUT ROWID;
CREATE INDEX remote_files_by_hash ON remote_files(hash) WHERE hash IS NOT NULL;

CREATE TABLE remote_index (
    folder   INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    device   INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    epoch    INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    PRIMARY KEY (folder, device)
) WITHOUT ROWID;
"#,
    // 5: deletes a scan held back because there were too many at once.
    r#"
ALTER TABLE folders ADD COLUMN held_deletes INTEGER NOT NULL DEFAULT 0;
"#,
    // 6: the history's chunk store: pack files and where each chunk is in them.
    r#"
CREATE TABLE store_packs (
    id         INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    size       INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE store_chunks (
    hash   BLOB    PRIMARY KEY,
    pack   INTEGER NOT NULL REFERENCES store_packs(id),
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX store_chunks_by_pack ON store_chunks(pack, offset);
"#,
    // 7: where a history version's bytes are (0: still the whole file under the
    // folder's `.ferry/versions/<history id>`, 1: in the chunk store), and which
    // side of a conflict stayed at the path on this device.
    r#"
ALTER TABLE history ADD COLUMN stored INTEGER NOT NULL DEFAULT 0 CHECK (stored IN (0, 1));
UPDATE history SET stored = 1 WHERE kind != 0 OR size = 0;
CREATE INDEX history_pending ON history(stored) WHERE stored = 0;
ALTER TABLE conflicts ADD COLUMN local_won INTEGER CHECK (local_won IN (0, 1));
"#,
    // 8: history rows a pull reserves (committed before it moves the version
    // they keep) and that are not versions until the pull commits.
    r#"
ALTER TABLE history ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0 CHECK (reserved IN (0, 1));
CREATE INDEX history_reserved ON history(id) WHERE reserved = 1;
"#,
    // 9: each folder's vault secret (random; the root of the keys that seal
    // what an untrusted holder stores).
    r#"
CREATE TABLE folder_secrets (
    folder INTEGER PRIMARY KEY REFERENCES folders(id) ON DELETE CASCADE,
    secret BLOB    NOT NULL CHECK (length(secret) = 32)
);
INSERT INTO folder_secrets (folder, secret) SELECT id, randomblob(32) FROM folders;
"#,
    // 10: encrypted backup holders: the devices holding this device's folders
    // sealed, and the vaults this device holds for others.
    r#"
ALTER TABLE folder_offers ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0 CHECK (encrypted IN (0, 1));
ALTER TABLE folder_offers ADD COLUMN secret BLOB CHECK (secret IS NULL OR length(secret) = 32);
CREATE TABLE vault_holders (
    folder   INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    device   INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    pushed   INTEGER NOT NULL DEFAULT 0,
    history  INTEGER NOT NULL DEFAULT 0,
    revision INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (folder, device)
) WITHOUT ROWID;
CREATE TABLE vaults (
    id         INTEGER PRIMARY KEY,
    folder_id  TEXT    NOT NULL UNIQUE,
    owner      INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    label      TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE vault_chunks (
    id    INTEGER PRIMARY KEY,
    vault INTEGER NOT NULL REFERENCES vaults(id) ON DELETE CASCADE,
    chunk BLOB    NOT NULL CHECK (length(chunk) = 32),
    bytes BLOB    NOT NULL,
    UNIQUE (vault, chunk)
);
CREATE TABLE vault_records (
    id     INTEGER PRIMARY KEY,
    vault  INTEGER NOT NULL REFERENCES vaults(id) ON DELETE CASCADE,
    record BLOB    NOT NULL CHECK (length(record) = 32),
    bytes  BLOB    NOT NULL,
    UNIQUE (vault, record)
);
"#,
    // 10 -> 11: which history versions went to each holder, under which
    // sealed record id, so that a version pruned here is dropped there too.
    r#"
CREATE TABLE vault_sent_versions (
    folder  INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    device  INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    record  BLOB    NOT NULL CHECK (length(record) = 32),
    PRIMARY KEY (folder, device, version)
) WITHOUT ROWID;
"#,
    // 11 -> 12: a vault's sealed chunks in the chunk store's pack files (keyed
    // there by the blake3 hash of the sealed bytes) rather than as blobs in the
    // index; the agent moves the rows `vault_chunks` holds into it at start.
    r#"
CREATE TABLE vault_stored (
    vault  INTEGER NOT NULL REFERENCES vaults(id) ON DELETE CASCADE,
    chunk  BLOB    NOT NULL CHECK (length(chunk) = 32),
    hash   BLOB    NOT NULL CHECK (length(hash) = 32),
    length INTEGER NOT NULL,
    PRIMARY KEY (vault, chunk)
) WITHOUT ROWID;
CREATE INDEX vault_stored_by_hash ON vault_stored(hash);
"#,
];
