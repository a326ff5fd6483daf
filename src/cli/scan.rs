//! `ferry scan [FOLDER]`: walk folders now and record their changes.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::output;
use crate::folder::{FolderError, FolderId};
use crate::home::Home;
use crate::index::Folder;
use crate::scan::{self, NoProgress, ScanOptions, ScanProgress};

/// A progress bar of bytes hashed, drawn only on a terminal.
struct Bar(ProgressBar);

impl ScanProgress for Bar {
    fn hash_plan(&self, files: u64, bytes: u64) {
        self.0.set_length(bytes);
        self.0.set_message(format!("{files} files to hash"));
    }
    fn hashed(&self, _path: &Path, bytes: u64) {
        self.0.inc(bytes);
    }
}

pub(super) fn selected(home: &Home, only: Option<&str>) -> anyhow::Result<Vec<Folder>> {
    let index = home.index()?;
    Ok(match only {
        Some(id) => vec![
            index
                .folder(&FolderId::new(id)?)?
                .ok_or_else(|| FolderError::Unknown(id.to_owned()))?,
        ],
        None => index.folders()?,
    })
}

pub(super) fn run(home: &Home, only: Option<&str>, json: bool) -> anyhow::Result<i32> {
    let folders = selected(home, only)?;
    if folders.is_empty() && !json {
        println!("No folders to scan: add one with `ferry folder add PATH`.");
    }
    let mut index = home.index()?;
    let opts = ScanOptions::from(&home.config().scan);
    let me = home.device_id().short();
    let mut failed = 0;
    let mut reports = Vec::new();
    for f in &folders {
        let started = Instant::now();
        let bar = (std::io::stderr().is_terminal() && !json).then(|| {
            let pb = ProgressBar::new(0).with_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            pb.set_prefix(f.id.to_string());
            Bar(pb)
        });
        let progress: &dyn ScanProgress = match &bar {
            Some(b) => b,
            None => &NoProgress,
        };
        let result = scan::scan(&mut index, f, me, &opts, progress);
        if let Some(b) = &bar {
            b.0.finish_and_clear();
        }
        let secs = started.elapsed().as_secs_f64();
        match result {
            Ok(r) => {
                if json {
                    reports.push(serde_json::json!({
                        "folder": f.id.as_str(), "ok": true, "seconds": secs, "report": r,
                    }));
                    continue;
                }
                println!(
                    "{}: {} entries; {} new, {} changed, {} deleted; hashed {} files ({}) in {:.2} s",
                    f.id,
                    r.entries,
                    r.new,
                    r.changed,
                    r.deleted,
                    r.hashed_files,
                    output::bytes(r.hashed_bytes),
                    secs
                );
                if r.held_deletes > 0 {
                    println!(
                        "{}: {} deletes held back (more than {}% of the folder at once); \
                         `ferry folder confirm-deletes {}` records them",
                        f.id, r.held_deletes, opts.hold_deletes_percent, f.id
                    );
                }
                for p in &r.changing {
                    println!("  {p}: kept changing while being hashed; left for the next scan");
                }
                for i in &r.issues {
                    println!("  {}: {}", i.path, i.error);
                }
            }
            Err(e) => {
                failed += 1;
                if json {
                    reports.push(serde_json::json!({
                        "folder": f.id.as_str(), "ok": false, "error": e.to_string(),
                    }));
                } else {
                    eprintln!("ferry: error: cannot scan {}: {e}", f.id);
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(if failed > 0 {
        super::EXIT_ERROR
    } else {
        super::EXIT_OK
    })
}
