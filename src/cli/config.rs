//! `ferry config get|set|list|path`: read and change settings by their dotted
//! key; a change is checked against the whole config, written atomically, and
//! handed to the running agent.

use std::path::Path;
use std::time::Duration;

use clap::Subcommand;
use serde_json::Value;

use crate::config::edit;
use crate::daemon::control::{self, ControlError, Request};
use crate::home::{self, Home, HomeError};

/// `ferry config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print a setting's value in effect (its default when the file leaves it
    /// out).
    Get {
        /// The dotted key, e.g. sync.debounce_ms or history.folders.docs.retention.
        key: String,
    },
    /// Change a setting in config.toml (comments and layout kept) and tell the
    /// running agent, which takes it on at once where it can.
    Set {
        /// The dotted key, e.g. sync.debounce_ms.
        key: String,
        /// The new value: a number, true/false, or a string.
        value: String,
    },
    /// Print every setting with its value in effect.
    List {
        /// Print as one JSON object, by dotted key.
        #[arg(long)]
        json: bool,
    },
    /// Print the config file's path.
    Path,
}

pub(super) fn run(root: &Path, cmd: ConfigCommand) -> anyhow::Result<i32> {
    match cmd {
        ConfigCommand::Path => {
            println!("{}", root.join(home::CONFIG_FILE).display());
        }
        ConfigCommand::Get { key } => {
            let home = Home::open(root)?;
            println!("{}", human(&edit::get(&home.config(), &key)?));
        }
        ConfigCommand::List { json } => {
            let home = Home::open(root)?;
            let all = edit::list(&home.config());
            if json {
                let v: serde_json::Map<String, Value> = all
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::to_value(v).expect("toml values convert")))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (k, v) in all {
                    println!("{k} = {v}");
                }
            }
        }
        ConfigCommand::Set { key, value } => return set(root, &key, &value),
    }
    Ok(super::EXIT_OK)
}

/// A value as a person reads it: strings without quotes.
fn human(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn set(root: &Path, key: &str, value: &str) -> anyhow::Result<i32> {
    if !root.join(home::KEY_FILE).exists() {
        return Err(HomeError::NotInitialised(root.to_owned()).into());
    }
    let path = root.join(home::CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    };
    let before = crate::config::Config::from_toml_str(&text).ok();
    let (new_text, config) = edit::set(&text, key, value)?;
    let shown = human(&edit::get(&config, key)?);
    let key = edit::normalise(key)?;
    let was = before
        .and_then(|c| edit::get(&c, &key).ok())
        .map(|v| human(&v));
    if new_text != text {
        home::write_atomic(&path, new_text.as_bytes(), 0o600)?;
    }
    match was {
        Some(w) if w != shown => println!("{key} = {shown} (was {w})"),
        _ => println!("{key} = {shown}"),
    }
    match control::call(root, &Request::ReloadConfig, Duration::from_secs(10)) {
        Ok(v) => {
            let listed = |field: &str| -> Vec<String> {
                v[field]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            };
            let (applied, restart) = (listed("applied"), listed("restart_needed"));
            if applied.contains(&key) {
                println!("The running agent applied it.");
            } else if restart.contains(&key) {
                println!(
                    "It takes effect when the agent restarts: the agent reads [device], \
                     [database] and [network] only when it starts."
                );
            } else {
                println!("The running agent already uses this value.");
            }
            let others: Vec<&String> = restart.iter().filter(|k| **k != key).collect();
            if !others.is_empty() {
                println!(
                    "Also waiting for a restart of the agent: {}",
                    others
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        Err(ControlError::NotRunning(_)) => {
            println!("The agent is not running; it reads the change when it starts.");
        }
        Err(e) => {
            anyhow::bail!(
                "saved in {}, but the running agent could not reload it: {e}",
                path.display()
            );
        }
    }
    Ok(super::EXIT_OK)
}
