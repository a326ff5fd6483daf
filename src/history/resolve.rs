//! Resolving a conflict: the version kept ends up at the path, the one not
//! wanted goes to the history (reason `conflict`), the conflict copy is
//! removed (a local delete, so sync removes it on every device), and the
//! conflict is marked resolved, all in one transaction. The caller holds the
//! folder's disk lock and rescans afterwards.

use std::fmt;
use std::str::FromStr;

use super::restore::{self, Moves, Source, check_disk, set_aside, stage};
use super::store::ChunkStore;
use super::{HistoryError, Result};
use crate::folder::{check_root, temp_dir};
use crate::index::{FileKind, Folder, HistoryReason, Index, OpenConflict};

/// Which version of a conflict to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// This device's version.
    Local,
    /// The other device's version.
    Remote,
    /// Both: the conflict copy stays as a file of its own.
    Both,
    /// A version from the history, by id.
    Version(i64),
}

impl FromStr for Keep {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "local" => Ok(Keep::Local),
            "remote" => Ok(Keep::Remote),
            "both" => Ok(Keep::Both),
            n => n.parse().map(Keep::Version).map_err(|_| {
                format!("invalid choice {n:?}: use local, remote, both or a version id")
            }),
        }
    }
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keep::Local => f.write_str("local"),
            Keep::Remote => f.write_str("remote"),
            Keep::Both => f.write_str("both"),
            Keep::Version(id) => write!(f, "{id}"),
        }
    }
}

/// What a resolution did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Resolution {
    /// The conflict's id.
    pub conflict: i64,
    /// The path.
    pub path: String,
    /// The conflict copy, and whether it was removed.
    pub conflict_path: String,
    /// Whether the conflict copy was removed.
    pub copy_removed: bool,
    /// History ids the unwanted versions were kept under.
    pub kept: Vec<i64>,
    /// How it was resolved (`local`, `remote`, `both`, `version N`).
    pub resolution: String,
}

/// Resolves `conflict` of `folder` by keeping `keep`.
pub fn resolve(
    index: &mut Index,
    store: &ChunkStore,
    folder: &Folder,
    conflict: &OpenConflict,
    keep: Keep,
) -> Result<Resolution> {
    check_root(folder)?;
    let root = &folder.path;
    let name = |p: &crate::relpath::RelPath| format!("{}:{p}", folder.id);
    let resolution = match keep {
        Keep::Version(id) => format!("version {id}"),
        k => k.to_string(),
    };
    let mut result = Resolution {
        conflict: conflict.id,
        path: conflict.path.to_string(),
        conflict_path: conflict.conflict_path.to_string(),
        copy_removed: false,
        kept: Vec::new(),
        resolution: resolution.clone(),
    };
    if keep == Keep::Both {
        let tx = index.history_tx()?;
        tx.resolve_conflict(conflict.id, &resolution)?;
        tx.commit()?;
        return Ok(result);
    }
    let at_path = index.local_file(folder.row, &conflict.path)?;
    let copy = index
        .local_file(folder.row, &conflict.conflict_path)?
        .filter(|c| !c.record.deleted && c.record.kind == FileKind::File);
    let Some(copy) = copy else {
        return Err(HistoryError::Refused(format!(
            "the conflict copy {} is not here (yet?): once it has synced, try again, or use --keep both",
            name(&conflict.conflict_path)
        )));
    };
    check_disk(root, &conflict.path, at_path.as_ref())?;
    check_disk(root, &conflict.conflict_path, Some(&copy))?;
    // Which of the two files holds the version to keep (None: a history version).
    let keep_copy = match keep {
        Keep::Local | Keep::Remote => {
            let Some(local_won) = conflict.local_won else {
                return Err(HistoryError::Refused(format!(
                    "this conflict was recorded before ferry noted which side is local: use --keep both, or a version id, or tidy up {} by hand",
                    name(&conflict.path)
                )));
            };
            // This device's version is at the path if it won, else the copy.
            Some((keep == Keep::Local) != local_won)
        }
        _ => None,
    };
    let staged = match keep {
        Keep::Version(id) => {
            let v = index
                .history_version(id)?
                .ok_or(HistoryError::UnknownVersion(id))?;
            if v.folder != folder.row || v.kind == FileKind::Dir {
                return Err(HistoryError::Refused(format!(
                    "version {id} is not a file version of folder {}",
                    folder.id
                )));
            }
            Some(stage(
                index,
                store,
                root,
                &Source::Version(Box::new(v)),
                &temp_dir(root),
            )?)
        }
        _ => None,
    };

    let mut moves = Moves::default();
    let mut doomed = Vec::new();
    let tx = index.history_tx()?;
    let done = (|| {
        let target = conflict.path.to_fs(root);
        let copy_file = conflict.conflict_path.to_fs(root);
        match (keep_copy, &staged) {
            (Some(false), _) => {
                // The path holds the keeper: the copy goes.
                result.kept.extend(set_aside(
                    &tx,
                    &mut moves,
                    &mut doomed,
                    folder,
                    &conflict.conflict_path,
                    HistoryReason::Conflict,
                )?);
            }
            (Some(true), _) => {
                // The copy holds the keeper: what is at the path goes, and
                // the copy takes its place.
                result.kept.extend(set_aside(
                    &tx,
                    &mut moves,
                    &mut doomed,
                    folder,
                    &conflict.path,
                    HistoryReason::Conflict,
                )?);
                moves.rename(&copy_file, &target)?;
            }
            (None, Some(s)) => {
                result.kept.extend(set_aside(
                    &tx,
                    &mut moves,
                    &mut doomed,
                    folder,
                    &conflict.path,
                    HistoryReason::RestoredOver,
                )?);
                result.kept.extend(set_aside(
                    &tx,
                    &mut moves,
                    &mut doomed,
                    folder,
                    &conflict.conflict_path,
                    HistoryReason::Conflict,
                )?);
                restore::ensure_parents(root, &conflict.path)?;
                moves.rename(&s.tmp, &target)?;
            }
            (None, None) => unreachable!("Both returned early"),
        }
        tx.resolve_conflict(conflict.id, &resolution)?;
        Ok::<_, HistoryError>(())
    })();
    if let Err(e) = done.and_then(|()| Ok(tx.commit()?)) {
        moves.undo();
        return Err(e);
    }
    moves.finish();
    for d in doomed {
        let _ = std::fs::remove_file(d);
    }
    result.copy_removed = true;
    Ok(result)
}
