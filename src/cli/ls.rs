//! `ferry ls FOLDER [PATH]`: what the index holds for each file (with
//! `--json`, also whether its bytes are in the history store: `stored`).

use serde_json::json;

use super::output;
use crate::folder::{FolderError, FolderId};
use crate::home::Home;
use crate::index::FileKind;
use crate::relpath::RelPath;

pub(super) fn run(
    home: &Home,
    folder: &str,
    path: Option<&str>,
    deleted: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let index = home.index()?;
    let f = index
        .folder(&FolderId::new(folder)?)?
        .ok_or_else(|| FolderError::Unknown(folder.to_owned()))?;
    let under = path
        .map(|p| RelPath::new(p.trim_end_matches('/')))
        .transpose()?;
    let records = index.list_files(f.row, under.as_ref(), deleted)?;
    if json {
        let stored = index.stored_files(f.row, under.as_ref())?;
        let v: Vec<_> = records
            .iter()
            .map(|r| {
                let version: serde_json::Map<String, serde_json::Value> = r
                    .version
                    .iter()
                    .map(|(d, c)| (d.to_string(), json!(c)))
                    .collect();
                json!({
                    "path": r.path.as_str(), "kind": r.meta.kind, "size": r.meta.size,
                    "mtime_ns": r.meta.mtime_ns, "permissions": format!("{:04o}", r.meta.permissions),
                    "hash": r.hash.map(|h| h.to_hex()), "symlink_target": r.symlink_target,
                    "deleted": r.deleted, "sequence": r.sequence, "version": version,
                    "modified_by": r.modified_by.to_string(), "chunks": r.chunk_count,
                    "stored": r.meta.kind == FileKind::File && !r.deleted && stored.contains(&r.path),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(super::EXIT_OK);
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let kind = match (r.deleted, r.meta.kind) {
                (true, _) => "deleted",
                (_, FileKind::File) => "file",
                (_, FileKind::Dir) => "dir",
                (_, FileKind::Symlink) => "link",
            };
            let name = match &r.symlink_target {
                Some(t) => format!("{} -> {t}", r.path),
                None => r.path.to_string(),
            };
            vec![
                kind.to_owned(),
                format!("{:04o}", r.meta.permissions),
                r.meta.size.to_string(),
                output::time(r.meta.mtime_ns.div_euclid(1_000_000_000)),
                r.chunk_count.to_string(),
                r.hash
                    .map(|h| h.to_hex()[..16].to_owned())
                    .unwrap_or_else(|| "-".into()),
                r.version.to_string(),
                name,
            ]
        })
        .collect();
    output::table(
        &[
            "KIND",
            "MODE",
            "SIZE",
            "MTIME (UTC)",
            "CHUNKS",
            "HASH",
            "VERSION",
            "PATH",
        ],
        &rows,
    );
    Ok(super::EXIT_OK)
}
