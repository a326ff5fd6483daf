//! `ferry status`: every folder's state and totals.

use serde_json::json;

use super::{folder::state, output};
use crate::home::Home;

pub(super) fn run(home: &Home, json: bool) -> anyhow::Result<i32> {
    let index = home.index()?;
    let folders = index.folders()?;
    let mut entries = Vec::new();
    for f in &folders {
        let stats = index.folder_stats(f.row)?;
        let (state, error) = state(f);
        entries.push((f, stats, state, error));
    }
    let agent = super::agent::agent_status(home);
    let offers = index.offers()?;
    if json {
        let v = json!({
            "device": { "id": home.device_id().to_string(), "name": home.config().device.name },
            "agent": agent,
            "offers": offers,
            "folders": entries.iter().map(|(f, s, state, error)| json!({
                "id": f.id.as_str(), "label": f.label, "path": f.path,
                "type": f.folder_type.as_str(), "state": state, "error": error,
                "files": s.files, "dirs": s.dirs, "symlinks": s.symlinks, "bytes": s.bytes,
                "deleted": s.deleted, "sequence": f.sequence, "last_scan_at": f.last_scan_at,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(super::EXIT_OK);
    }
    println!(
        "Device {} ({})",
        home.config().device.name,
        home.device_id()
    );
    match &agent {
        Some(a) => println!(
            "Agent running (pid {}), {} links from unknown devices refused",
            a["pid"], a["refused_links"]
        ),
        None => println!("Agent not running (start it with `ferry daemon`)"),
    }
    for o in &offers {
        println!(
            "Offer {}: {} offers folder {} ({}); take it with `ferry folder accept {} --into PATH`",
            o.id, o.device_name, o.folder_id, o.label, o.id
        );
    }
    if folders.is_empty() {
        println!("No folders yet: add one with `ferry folder add PATH`.");
        return Ok(super::EXIT_OK);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|(f, s, state, _)| {
            vec![
                f.id.to_string(),
                state.to_string(),
                s.files.to_string(),
                s.dirs.to_string(),
                output::bytes(s.bytes),
                f.last_scan_at
                    .map(output::time)
                    .unwrap_or_else(|| "never".into()),
                f.path.display().to_string(),
            ]
        })
        .collect();
    output::table(
        &[
            "FOLDER",
            "STATE",
            "FILES",
            "DIRS",
            "SIZE",
            "LAST SCAN (UTC)",
            "PATH",
        ],
        &rows,
    );
    for (f, _, _, error) in &entries {
        if let Some(e) = error {
            println!("{}: {e}", f.id);
        }
    }
    Ok(super::EXIT_OK)
}
