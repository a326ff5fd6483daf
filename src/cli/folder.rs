//! `ferry folder add|list|accept|confirm-deletes|decline|remove` (and the
//! dispatch of `key`, in `folder_key`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

use super::output;
use crate::folder::{self, FolderError, FolderId, FolderType, NewFolder};
use crate::home::Home;
use crate::index::Folder;

/// `ferry folder …`
#[derive(Debug, Subcommand)]
pub enum FolderCommand {
    /// Start syncing a directory.
    Add {
        /// The directory.
        path: PathBuf,
        /// The folder id shared with peers (default: random).
        #[arg(long)]
        id: Option<String>,
        /// A human name (default: the directory name).
        #[arg(long)]
        label: Option<String>,
        /// send-receive, send-only or receive-only.
        #[arg(long = "type", default_value = "send-receive", value_parser = parse_type)]
        folder_type: FolderType,
    },
    /// List folders.
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take a folder another device offered (see `ferry status`).
    Accept {
        /// The offer number shown by `ferry status`.
        offer: i64,
        /// Where to keep the folder (created if missing); not for a folder
        /// offered to hold encrypted, which has no files here.
        #[arg(long)]
        into: Option<PathBuf>,
    },
    /// Record and send the deletes a scan held back because there were too
    /// many at once (check first that the folder's disk is really mounted).
    ConfirmDeletes {
        /// The folder id.
        id: String,
    },
    /// Decline a folder another device offered.
    Decline {
        /// The offer number shown by `ferry status`.
        offer: i64,
    },
    /// Stop syncing a folder and forget its index; never touches its files.
    Remove {
        /// The folder id.
        id: String,
    },
    /// Print the folder's recovery code (its secret key, for restoring it from
    /// an encrypted backup); keep it offline.
    Key {
        /// The folder id.
        folder: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn parse_type(s: &str) -> Result<FolderType, String> {
    s.parse().map_err(|e: FolderError| e.to_string())
}

/// The health of a folder as shown by `folder list` and `status`.
pub(super) fn state(f: &Folder) -> (&'static str, Option<String>) {
    if let Err(e) = folder::check_root(f) {
        return ("error", Some(e.to_string()));
    }
    match (&f.error, f.last_scan_at) {
        (Some(e), _) => ("error", Some(e.clone())),
        (None, None) => ("unscanned", None),
        (None, Some(_)) => ("idle", None),
    }
}

pub(super) fn run(home: &Home, cmd: FolderCommand) -> anyhow::Result<i32> {
    let mut index = home.index()?;
    match cmd {
        FolderCommand::Add {
            path,
            id,
            label,
            folder_type,
        } => {
            let id = id.as_deref().map(FolderId::new).transpose()?;
            let f = folder::add(
                &mut index,
                NewFolder {
                    path: path.clone(),
                    id,
                    label,
                    folder_type,
                },
            )
            .with_context(|| format!("cannot add {}", path.display()))?;
            println!(
                "Added folder {} ({}) at {} [{}]",
                f.id,
                f.label,
                f.path.display(),
                f.folder_type
            );
            if reload_agent(home) {
                println!("The running agent picked it up and is scanning it.");
            } else {
                println!("Run `ferry scan {}` to index it.", f.id);
            }
        }
        FolderCommand::List { json } => {
            let folders = index.folders()?;
            if json {
                let v: Vec<_> = folders
                    .iter()
                    .map(|f| {
                        let (state, error) = state(f);
                        json!({
                            "id": f.id.as_str(), "label": f.label, "path": f.path,
                            "type": f.folder_type.as_str(), "state": state, "error": error,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if folders.is_empty() {
                println!("No folders yet: add one with `ferry folder add PATH`.");
            } else {
                let rows: Vec<Vec<String>> = folders
                    .iter()
                    .map(|f| {
                        vec![
                            f.id.to_string(),
                            f.label.clone(),
                            f.folder_type.to_string(),
                            state(f).0.to_owned(),
                            f.path.display().to_string(),
                        ]
                    })
                    .collect();
                output::table(&["ID", "LABEL", "TYPE", "STATE", "PATH"], &rows);
            }
        }
        FolderCommand::Accept { offer, into } => {
            let o = index
                .offers()?
                .into_iter()
                .find(|o| o.id == offer)
                .ok_or_else(|| anyhow::anyhow!("no pending offer {offer} (see `ferry status`)"))?;
            let device: crate::device::DeviceId = o.device.parse()?;
            if o.encrypted {
                if into.is_some() {
                    anyhow::bail!(
                        "offer {offer} is a folder to hold encrypted: it has no files here, so no --into"
                    );
                }
                index.add_vault(&o.folder_id, &device, &o.label)?;
                reload_agent(home);
                println!(
                    "Holding folder {} ({}) for {}, encrypted: this device stores it but cannot read it.",
                    o.folder_id, o.label, o.device_name
                );
                return Ok(super::EXIT_OK);
            }
            let into = into.ok_or_else(|| {
                anyhow::anyhow!("say where to keep folder {} with --into PATH", o.folder_id)
            })?;
            std::fs::create_dir_all(&into)
                .with_context(|| format!("cannot create {}", into.display()))?;
            let fid = FolderId::new(&o.folder_id)?;
            let f = folder::add(
                &mut index,
                NewFolder {
                    path: into.clone(),
                    id: Some(fid.clone()),
                    label: Some(o.label.clone()),
                    folder_type: FolderType::default(),
                },
            )
            .with_context(|| format!("cannot add {}", into.display()))?;
            if let Some(secret) = &o.secret {
                index.set_folder_secret(f.row, secret)?;
            }
            index.share_folder(&fid, &device)?;
            reload_agent(home);
            println!(
                "Accepted folder {} ({}) from {} at {}",
                f.id,
                f.label,
                o.device_name,
                f.path.display()
            );
        }
        FolderCommand::ConfirmDeletes { id } => {
            use crate::daemon::control::{self, ControlError, Request};
            let fid = FolderId::new(&id)?;
            let f = index
                .folder(&fid)?
                .ok_or_else(|| FolderError::Unknown(id.clone()))?;
            let req = Request::ConfirmDeletes { folder: id.clone() };
            let deleted =
                match control::call(home.root(), &req, std::time::Duration::from_secs(600)) {
                    Ok(v) => v["deleted"].as_u64().unwrap_or(0),
                    Err(ControlError::NotRunning(_)) => {
                        let mut opts = crate::scan::ScanOptions::from(&home.config().scan);
                        opts.confirm_deletes = true;
                        crate::scan::scan(
                            &mut index,
                            &f,
                            home.device_id().short(),
                            &opts,
                            &crate::scan::NoProgress,
                        )?
                        .deleted
                    }
                    Err(e) => return Err(e.into()),
                };
            println!("Recorded {deleted} deletes in folder {id}; they sync to its devices.");
        }
        FolderCommand::Decline { offer } => {
            if !index.decline_offer(offer)? {
                anyhow::bail!("no pending offer {offer} (see `ferry status`)");
            }
            println!("Declined offer {offer}.");
        }
        FolderCommand::Key { folder, json } => {
            return super::folder_key::run(&mut index, &folder, json);
        }
        FolderCommand::Remove { id } => {
            let fid = FolderId::new(&id)?;
            let f = index
                .folder(&fid)?
                .ok_or_else(|| FolderError::Unknown(id.clone()))?;
            index.remove_folder(&fid)?;
            reload_agent(home);
            println!(
                "Removed folder {}; its files at {} were not touched.",
                f.id,
                f.path.display()
            );
        }
    }
    Ok(super::EXIT_OK)
}

/// Tells a running agent that folders changed; `false` if none runs.
fn reload_agent(home: &Home) -> bool {
    use crate::daemon::control::{self, Request};
    control::call(
        home.root(),
        &Request::Reload,
        std::time::Duration::from_secs(10),
    )
    .is_ok()
}
