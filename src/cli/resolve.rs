//! `ferry resolve PATH --keep local|remote|both|VERSION`: resolves an open
//! conflict through the agent (which holds the folder's disk lock and rescans,
//! so the removed conflict copy is removed on every device).

use std::time::Duration;

use serde_json::Value;

use super::history::target;
use crate::daemon::control::{self, Request};
use crate::history::resolve::Keep;
use crate::home::Home;

/// Runs `ferry resolve`.
pub(super) fn run(home: &Home, path: &str, keep: Keep, json: bool) -> anyhow::Result<i32> {
    let index = home.index()?;
    let t = target(&index, path)?;
    let Some(rel) = t.path.clone() else {
        anyhow::bail!("{} is a folder: name the conflicting file", t.name());
    };
    if index.open_conflicts(t.folder.row, &rel)?.is_empty() {
        anyhow::bail!("no open conflict of {} (see `ferry conflicts`)", t.name());
    }
    let v = control::call(
        home.root(),
        &Request::Resolve {
            folder: t.folder.id.to_string(),
            path: rel.as_str().to_owned(),
            keep: keep.to_string(),
        },
        Duration::from_secs(600),
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(super::EXIT_OK);
    }
    let folder = t.folder.id.as_str();
    let path = v["path"].as_str().unwrap_or("?");
    let copy = v["conflict_path"].as_str().unwrap_or("?");
    let kept: Vec<String> = v["kept"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_i64)
                .map(|i| i.to_string())
                .collect()
        })
        .unwrap_or_default();
    match keep {
        Keep::Both => println!(
            "Resolved the conflict of {folder}:{path}: both files stay ({copy} is a file of its own now)."
        ),
        _ => {
            println!(
                "Resolved the conflict of {folder}:{path}: kept {}; removed the conflict copy {copy} (on every device, once synced).",
                match keep {
                    Keep::Local => "this device's version".to_owned(),
                    Keep::Remote => "the other device's version".to_owned(),
                    Keep::Version(id) => format!("version {id}"),
                    Keep::Both => unreachable!(),
                }
            );
            if !kept.is_empty() {
                println!(
                    "What was replaced is in the history as version {}.",
                    kept.join(" and ")
                );
            }
        }
    }
    Ok(super::EXIT_OK)
}
