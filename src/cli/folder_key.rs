//! `ferry folder key FOLDER`: the folder's vault secret as a recovery code, for
//! a person to keep offline. The code goes to stdout alone (so it can be piped),
//! the warning to stderr.

use serde::Serialize;
use zeroize::Zeroizing;

use crate::folder::{FolderError, FolderId};
use crate::index::Index;

/// What the person must know before keeping the code.
const WARNING: &str = "\
This recovery code is the folder's secret key. With it, anyone who can reach a \
device holding the folder's encrypted backups can read the whole folder: file \
names, contents and history. Keep it offline (on paper, or in a password \
manager), never inside the folder itself, and show it to no one. It is what \
restores the folder from an encrypted backup when no trusted device is left.";

#[derive(Serialize)]
struct KeyJson<'a> {
    folder: &'a str,
    label: &'a str,
    recovery_code: &'a str,
    warning: &'a str,
}

pub(super) fn run(index: &mut Index, id: &str, json: bool) -> anyhow::Result<i32> {
    let fid = FolderId::new(id)?;
    let folder = index
        .folder(&fid)?
        .ok_or_else(|| FolderError::Unknown(id.to_owned()))?;
    let code = index.folder_secret(folder.row)?.recovery_code();
    eprintln!(
        "Recovery code of folder {} ({}).\n{WARNING}",
        folder.id, folder.label
    );
    if json {
        let text = Zeroizing::new(serde_json::to_string_pretty(&KeyJson {
            folder: folder.id.as_str(),
            label: &folder.label,
            recovery_code: &code,
            warning: WARNING,
        })?);
        println!("{}", *text);
    } else {
        println!("{}", *code);
    }
    Ok(super::EXIT_OK)
}
