//! `ferry conflicts`: the concurrent edits found, and where the losing version
//! was kept.

use super::output;
use crate::home::Home;

pub(super) fn run(home: &Home, json: bool) -> anyhow::Result<i32> {
    let index = home.index()?;
    let list = index.conflicts()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(super::EXIT_OK);
    }
    if list.is_empty() {
        println!("No conflicts.");
        return Ok(super::EXIT_OK);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            vec![
                c.folder.clone(),
                c.path.clone(),
                c.conflict_path.clone(),
                c.remote_device[..c.remote_device.len().min(12)].to_owned(),
                output::time(c.detected_at),
                if c.resolved_at.is_some() {
                    "resolved"
                } else {
                    "open"
                }
                .to_owned(),
            ]
        })
        .collect();
    output::table(
        &[
            "FOLDER",
            "PATH",
            "OTHER VERSION KEPT AS",
            "DEVICE",
            "FOUND (UTC)",
            "STATE",
        ],
        &rows,
    );
    Ok(super::EXIT_OK)
}
