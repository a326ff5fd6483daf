//! Reading and changing single settings by their dotted key
//! (`sync.debounce_ms`, `history.folders."docs".retention`), as `ferry config`
//! does: the file is edited in place with its comments and layout kept, and a
//! change is accepted only if the whole file still parses and validates.
//!
//! Also which settings the running agent can take on without a restart.

use std::collections::BTreeMap;

use toml_edit::{DocumentMut, Item, Table};

use super::{Config, ConfigError};

/// The settings `[history.folders."<id>"]` may override.
const OVERRIDE_FIELDS: [&str; 4] = ["retention", "max_age_days", "max_size_mb", "local"];

/// Sections whose settings the agent reads only when it starts: the device
/// name (sent to peers when a link opens), the database connections, and the
/// network endpoint.
const RESTART_SECTIONS: [&str; 3] = ["device", "database", "network"];

/// Why a setting could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// No such setting.
    #[error("unknown setting {key:?}{}; `ferry config list` shows them all", suggestion.as_ref().map(|s| format!(" (did you mean {s}?)")).unwrap_or_default())]
    UnknownKey {
        /// The key asked for.
        key: String,
        /// The closest known key, if one is close.
        suggestion: Option<String>,
    },
    /// A section, not a setting.
    #[error("{key} is a section, not a setting; its settings: {}", keys.join(", "))]
    Section {
        /// The section's key.
        key: String,
        /// The settings in it.
        keys: Vec<String>,
    },
    /// The value is not of the setting's type.
    #[error("{key} takes {expected}, not {value:?}")]
    WrongType {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What the setting takes.
        expected: &'static str,
    },
    /// The key is not valid TOML key syntax.
    #[error("{key:?} is not a setting name: use dotted keys such as sync.debounce_ms")]
    BadKey {
        /// The key given.
        key: String,
    },
    /// The current file is not valid TOML.
    #[error("the config file is not valid TOML, fix it first: {0}")]
    File(String),
    /// The file with the change would not be a valid config.
    #[error("{0}")]
    Invalid(String),
}

/// A setting's key split into its parts.
fn parse_key(key: &str) -> Result<Vec<String>, EditError> {
    toml_edit::Key::parse(key)
        .map(|parts| parts.iter().map(|k| k.get().to_owned()).collect())
        .map_err(|_| EditError::BadKey {
            key: key.to_owned(),
        })
}

/// Joins key parts back into a dotted key, quoting parts that need it.
fn join_key(parts: &[String]) -> String {
    parts
        .iter()
        .map(|p| toml_edit::Key::new(p.as_str()).display_repr().into_owned())
        .collect::<Vec<_>>()
        .join(".")
}

/// A key written the way [`list`] writes it (`history.folders."docs".local`
/// becomes `history.folders.docs.local`).
pub fn normalise(key: &str) -> Result<String, EditError> {
    parse_key(key).map(|p| join_key(&p))
}

fn to_value(config: &Config) -> toml::Table {
    toml::Table::try_from(config).expect("the config serializes to a table")
}

fn flatten(prefix: &mut Vec<String>, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (k, v) in table {
        prefix.push(k.clone());
        match v {
            toml::Value::Table(t) => flatten(prefix, t, out),
            other => {
                out.insert(join_key(prefix), other.clone());
            }
        }
        prefix.pop();
    }
}

/// Every setting of `config` with its value, by dotted key: all of the
/// fixed ones, and the per-folder history overrides that are set.
pub fn list(config: &Config) -> BTreeMap<String, toml::Value> {
    let mut out = BTreeMap::new();
    flatten(&mut Vec::new(), &to_value(config), &mut out);
    out
}

/// The fixed settings' keys and the per-folder override pattern, for "did you
/// mean".
fn known_keys() -> Vec<String> {
    let mut keys: Vec<String> = list(&Config::default()).into_keys().collect();
    keys.extend(
        OVERRIDE_FIELDS
            .iter()
            .map(|f| format!("history.folders.\"ID\".{f}")),
    );
    keys
}

/// Where a key points: a fixed setting, or a per-folder history override.
enum Target {
    Fixed(Vec<String>),
    Override { folder: String, field: String },
}

fn target(key: &str) -> Result<Target, EditError> {
    let parts = parse_key(key)?;
    if parts.len() == 4
        && parts[0] == "history"
        && parts[1] == "folders"
        && OVERRIDE_FIELDS.contains(&parts[3].as_str())
    {
        return Ok(Target::Override {
            folder: parts[2].clone(),
            field: parts[3].clone(),
        });
    }
    let defaults = list(&Config::default());
    let dotted = join_key(&parts);
    if defaults.contains_key(&dotted) {
        return Ok(Target::Fixed(parts));
    }
    let under: Vec<String> = defaults
        .keys()
        .filter(|k| k.starts_with(&format!("{dotted}.")))
        .cloned()
        .collect();
    if !under.is_empty() {
        return Err(EditError::Section {
            key: dotted,
            keys: under,
        });
    }
    if dotted == "history.folders" || (parts.len() == 3 && dotted.starts_with("history.folders.")) {
        return Err(EditError::Section {
            key: dotted,
            keys: OVERRIDE_FIELDS
                .iter()
                .map(|f| format!("history.folders.\"ID\".{f}"))
                .collect(),
        });
    }
    Err(EditError::UnknownKey {
        key: key.to_owned(),
        suggestion: suggest(&dotted, &known_keys()),
    })
}

/// The effective value of a setting: what the file says, else the default;
/// for a folder's history override that is not set, the `[history]` value.
pub fn get(config: &Config, key: &str) -> Result<toml::Value, EditError> {
    match target(key)? {
        Target::Fixed(parts) => Ok(list(config)
            .remove(&join_key(&parts))
            .expect("a fixed key has a value")),
        Target::Override { folder, field } => {
            let own = config
                .history
                .folders
                .get(&folder)
                .map(|o| toml::Table::try_from(o).expect("overrides serialize"))
                .and_then(|mut t| t.remove(&field));
            Ok(match own {
                Some(v) => v,
                None => to_value(config)["history"][field.as_str()].clone(),
            })
        }
    }
}

/// The type of value a setting takes, from its default.
fn kind(key: &Target) -> toml::Value {
    let defaults = to_value(&Config::default());
    match key {
        Target::Fixed(parts) => {
            let mut v = &toml::Value::Table(defaults.clone());
            for p in parts {
                v = &v[p.as_str()];
            }
            v.clone()
        }
        Target::Override { field, .. } => defaults["history"][field.as_str()].clone(),
    }
}

/// Parses `raw` as a value of the setting's type.
fn parse_value(key: &str, target: &Target, raw: &str) -> Result<toml_edit::Value, EditError> {
    let wrong = |expected| EditError::WrongType {
        key: key.to_owned(),
        value: raw.to_owned(),
        expected,
    };
    match kind(target) {
        toml::Value::Integer(_) => {
            let n: u64 = raw
                .trim()
                .replace('_', "")
                .parse()
                .map_err(|_| wrong("a whole number (0 or more)"))?;
            let n = i64::try_from(n).map_err(|_| wrong("a whole number up to 2^63-1"))?;
            Ok(toml_edit::Value::from(n))
        }
        toml::Value::Boolean(_) => match raw.trim() {
            "true" => Ok(toml_edit::Value::from(true)),
            "false" => Ok(toml_edit::Value::from(false)),
            _ => Err(wrong("true or false")),
        },
        _ => {
            // A string: taken as given, or as a TOML string if quoted.
            let quoted = raw.len() >= 2
                && ((raw.starts_with('"') && raw.ends_with('"'))
                    || (raw.starts_with('\'') && raw.ends_with('\'')));
            let text = if quoted {
                raw.parse::<toml_edit::Value>()
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .ok_or_else(|| wrong("a string"))?
            } else {
                raw.to_owned()
            };
            Ok(toml_edit::Value::from(text))
        }
    }
}

/// The table at `path` in `doc`, made if missing (intermediate tables made
/// implicit, so no empty `[history.folders]` header appears).
fn table_at<'a>(doc: &'a mut DocumentMut, path: &[String]) -> Result<&'a mut Table, EditError> {
    let mut table = doc.as_table_mut();
    for (i, part) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        let item = table.entry(part).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(!last);
            Item::Table(t)
        });
        if let Item::Value(toml_edit::Value::InlineTable(_)) = item {
            let inline = std::mem::replace(item, Item::None);
            let Item::Value(toml_edit::Value::InlineTable(t)) = inline else {
                unreachable!("checked above")
            };
            *item = Item::Table(t.into_table());
        }
        table = item
            .as_table_mut()
            .ok_or_else(|| EditError::File(format!("{} is not a table", join_key(&path[..=i]))))?;
    }
    Ok(table)
}

/// Sets `key` to `raw` in the config file's `text`, keeping its comments and
/// layout. Returns the new text and the config it parses to; refuses (leaving
/// nothing changed) a value of the wrong type or outside what is allowed.
pub fn set(text: &str, key: &str, raw: &str) -> Result<(String, Config), EditError> {
    let target = target(key)?;
    let value = parse_value(key, &target, raw)?;
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| EditError::File(e.message().to_owned()))?;
    let (path, leaf) = match &target {
        Target::Fixed(parts) => (
            parts[..parts.len() - 1].to_vec(),
            parts.last().expect("key"),
        ),
        Target::Override { folder, field } => (
            vec!["history".to_owned(), "folders".to_owned(), folder.clone()],
            field,
        ),
    };
    let table = table_at(&mut doc, &path)?;
    let mut value = value;
    match table.get_mut(leaf) {
        Some(Item::Value(old)) => {
            // Keep the spacing and a trailing comment of the line.
            *value.decor_mut() = old.decor().clone();
            *old = value;
        }
        _ => {
            table.insert(leaf, Item::Value(value));
        }
    }
    let new_text = doc.to_string();
    let config = Config::from_toml_str(&new_text).map_err(|e| match e {
        ConfigError::Parse(p) => EditError::Invalid(format!("{key}: {}", p.message().trim())),
        other => EditError::Invalid(other.to_string()),
    })?;
    Ok((new_text, config))
}

/// Whether the running agent takes on a change of `key` without a restart.
pub fn applies_live(key: &str) -> bool {
    let section = key.split('.').next().unwrap_or(key);
    !RESTART_SECTIONS.contains(&section)
}

/// The keys whose values differ between two configs (a key in only one of
/// them counts as changed).
pub fn changed(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (list(old), list(new));
    let mut keys: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    keys.extend(b.keys().filter(|k| !a.contains_key(*k)).cloned());
    keys.sort();
    keys
}

/// `new` with the settings that need a restart taken from `running`: what an
/// agent running with `running` uses after reading `new`.
pub fn live_part(running: &Config, new: &Config) -> Config {
    Config {
        device: running.device.clone(),
        database: running.database.clone(),
        network: running.network.clone(),
        ..new.clone()
    }
}

/// The known key closest to `key`, if it is close: same last part (a setting
/// looked for in the wrong section), or a few typos away.
fn suggest(key: &str, known: &[String]) -> Option<String> {
    let last = key.rsplit('.').next().unwrap_or(key);
    if let Some(k) = known
        .iter()
        .find(|k| k.rsplit('.').next() == Some(last) && !k.contains("\"ID\""))
    {
        return Some(k.clone());
    }
    let (best, d) = known
        .iter()
        .map(|k| (k, distance(key, k)))
        .min_by_key(|(_, d)| *d)?;
    (d <= (key.len() / 3).max(2)).then(|| best.clone())
}

/// Levenshtein distance between two strings, by characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commented() -> String {
        Config::default().to_commented_toml()
    }

    #[test]
    fn set_keeps_comments_and_changes_only_the_value() {
        let text = commented();
        let (new, config) = set(&text, "sync.debounce_ms", "500").unwrap();
        assert_eq!(config.sync.debounce_ms, 500);
        let old_lines: Vec<&str> = text.lines().collect();
        let new_lines: Vec<&str> = new.lines().collect();
        assert_eq!(old_lines.len(), new_lines.len());
        let diff: Vec<_> = old_lines
            .iter()
            .zip(&new_lines)
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(
            diff,
            vec![(&"debounce_ms = 200", &"debounce_ms = 500")],
            "{new}"
        );
    }

    #[test]
    fn values_out_of_range_or_of_the_wrong_type_say_what_is_allowed() {
        let text = commented();
        let e = set(&text, "scan.hash_threads", "0")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "scan.hash_threads = 0 is not allowed: 1 to 64");
        let e = set(&text, "sync.debounce_ms", "fast")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a whole number"), "{e}");
        let e = set(&text, "network.discovery", "maybe")
            .unwrap_err()
            .to_string();
        assert!(e.contains("true or false"), "{e}");
        let e = set(&text, "history.retention", "weekly")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("history.retention") && e.contains("staggered") && e.contains("keep-all"),
            "{e}"
        );
        let e = set(&text, "network.relays", "sometimes")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"default\", \"disabled\""), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused_with_the_closest_one() {
        let e = set(&commented(), "scan.debounce_ms", "1").unwrap_err();
        assert!(
            e.to_string().contains("did you mean sync.debounce_ms?"),
            "{e}"
        );
        let e = get(&Config::default(), "sync.debounce").unwrap_err();
        assert!(
            e.to_string().contains("did you mean sync.debounce_ms?"),
            "{e}"
        );
        let e = get(&Config::default(), "colour").unwrap_err();
        assert!(!e.to_string().contains("did you mean"), "{e}");
        let e = get(&Config::default(), "scan").unwrap_err();
        assert!(e.to_string().contains("scan.hash_threads"), "{e}");
    }

    #[test]
    fn folder_overrides_are_set_in_their_own_table_and_inherit_when_unset() {
        let (text, config) =
            set(&commented(), "history.folders.docs.retention", "keep-all").unwrap();
        assert!(
            text.contains("[history.folders.docs]\nretention = \"keep-all\""),
            "{text}"
        );
        assert!(!text.contains("[history.folders]\n"), "{text}");
        assert_eq!(
            get(&config, "history.folders.docs.retention").unwrap(),
            toml::Value::String("keep-all".into())
        );
        assert_eq!(
            get(&config, "history.folders.docs.max_age_days").unwrap(),
            toml::Value::Integer(365)
        );
        assert!(list(&config).contains_key("history.folders.docs.retention"));
        let e = set(&text, "history.folders.\".bad\".local", "true").unwrap_err();
        assert!(e.to_string().contains("folder ids"), "{e}");
    }

    #[test]
    fn only_device_database_and_network_need_a_restart() {
        assert!(applies_live("sync.debounce_ms"));
        assert!(applies_live("history.folders.docs.local"));
        assert!(!applies_live("network.listen"));
        assert!(!applies_live("device.name"));
        let mut new = Config::default();
        new.network.relays = "disabled".into();
        new.scan.hold_deletes_min = 3;
        let running = live_part(&Config::default(), &new);
        assert_eq!(
            changed(&Config::default(), &running),
            ["scan.hold_deletes_min"]
        );
        assert_eq!(changed(&running, &new), ["network.relays"]);
    }
}
