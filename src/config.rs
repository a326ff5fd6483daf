//! The device's TOML configuration: its typed form, defaults, and the commented
//! file `ferry init` writes; [`edit`] reads and changes single settings.

pub mod edit;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::folder::FolderId;
use crate::history::retention::{Policy, Retention};

/// Everything in `config.toml`. Unknown keys are refused, so a typo is reported
/// instead of silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[device]`
    pub device: DeviceConfig,
    /// `[database]`
    pub database: DatabaseConfig,
    /// `[scan]`
    pub scan: ScanConfig,
    /// `[network]`
    pub network: NetworkConfig,
    /// `[sync]`
    pub sync: SyncConfig,
    /// `[history]`
    pub history: HistoryConfig,
}

/// `[history]`: how long earlier versions are kept, with per-folder overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// `staggered` or `keep-all`.
    pub retention: Retention,
    /// Versions older than this many days are pruned; 0 keeps them forever.
    pub max_age_days: u32,
    /// Cap on each folder's history in MiB; 0 for no cap.
    pub max_size_mb: u64,
    /// Also keep versions replaced by local edits the scanner sees.
    pub local: bool,
    /// `[history.folders."<folder id>"]`: overrides for one folder.
    pub folders: BTreeMap<String, HistoryOverride>,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            retention: Retention::Staggered,
            max_age_days: 365,
            max_size_mb: 0,
            local: false,
            folders: BTreeMap::new(),
        }
    }
}

/// `[history.folders."<folder id>"]`: any of the `[history]` settings, for one
/// folder; those left out come from `[history]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryOverride {
    /// Overrides `history.retention`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Overrides `history.max_age_days`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age_days: Option<u32>,
    /// Overrides `history.max_size_mb`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size_mb: Option<u64>,
    /// Overrides `history.local`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<bool>,
}

/// Largest `max_age_days` accepted (100 years).
const MAX_AGE_DAYS: u32 = 36_500;
/// Largest `max_size_mb` accepted (1 PiB).
const MAX_SIZE_MB: u64 = 1 << 30;

/// `[sync]`: the background sync of folders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// How long the watcher waits for a burst of changes to settle, in ms.
    pub debounce_ms: u64,
    /// Full rescan interval in seconds, as a backstop for missed events.
    pub rescan_interval_secs: u64,
    /// Chunk requests in flight per folder.
    pub requests_in_flight: usize,
    /// Files pulled at the same time per folder.
    pub parallel_files: usize,
    /// How long one request to a peer (or from one) may take, in seconds: a
    /// peer that stalls is given up on after this and asked last.
    pub request_timeout_secs: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            debounce_ms: 200,
            rescan_interval_secs: 3600,
            // Measured with benches/sync.sh on loopback (3 alternated
            // pairs): 12 pull the 1 GiB file in 1.78-2.11 s, 24 in
            // 2.00-2.19 s. Before netwatch was patched (vendor/README.md),
            // more in flight made iroh drop the requester's packets and 48
            // took 4.5-5.2 s; now 48 takes 1.9-2.1 s, no faster than 12.
            requests_in_flight: 12,
            parallel_files: 8,
            request_timeout_secs: 60,
        }
    }
}

impl SyncConfig {
    /// [`SyncConfig::request_timeout_secs`] as a duration.
    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.request_timeout_secs)
    }
}

/// `[network]`: how the agent reaches other devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Address and UDP port to listen on. Port 0 picks a free port once and keeps
    /// it across restarts, so peers find this device where they last saw it.
    pub listen: String,
    /// `default` (public relays, for devices behind NATs), `disabled`, or the
    /// URL of a relay of your own.
    pub relays: String,
    /// Publish and look up addresses through internet discovery (DNS/pkarr).
    pub discovery: bool,
    /// Find devices on the local network with mDNS.
    pub local_discovery: bool,
    /// Ask the router to forward a port (UPnP, NAT-PMP, PCP).
    pub port_mapping: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:0".into(),
            relays: "default".into(),
            discovery: true,
            local_discovery: true,
            port_mapping: true,
        }
    }
}

impl NetworkConfig {
    /// The same settings with everything that needs the internet turned off:
    /// for LANs without internet access, and for tests.
    pub fn offline(mut self) -> Self {
        self.relays = "disabled".into();
        self.discovery = false;
        self.port_mapping = false;
        self
    }
}

/// `[device]`: how this device presents itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// The name other devices see.
    pub name: String,
}

/// `[database]`: the SQLite index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// How long to wait for another process's write to finish, in milliseconds.
    pub busy_timeout_ms: u64,
}

/// `[scan]`: finding local changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScanConfig {
    /// Files hashed at the same time; large files also use a second core each.
    pub hash_threads: usize,
    /// Index changes committed per transaction.
    pub batch_files: usize,
    /// How often to hash again a file that keeps changing while it is hashed.
    pub changing_retries: u32,
    /// A scan that would delete more than this percentage of a folder's
    /// entries holds the deletes back until `ferry folder confirm-deletes`.
    pub hold_deletes_percent: u32,
    /// ... but only when it would delete at least this many.
    pub hold_deletes_min: u64,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            name: default_device_name(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            busy_timeout_ms: 5_000,
        }
    }
}

impl Default for ScanConfig {
    fn default() -> Self {
        Self {
            hash_threads: 2,
            batch_files: 1_000,
            changing_retries: 3,
            hold_deletes_percent: 50,
            hold_deletes_min: 10,
        }
    }
}

/// The machine's host name, or "ferry-device" when it has none.
pub fn default_device_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "ferry-device".to_owned())
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML, a wrong type, or an unknown key (the message gives the line).
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// A value outside what is allowed.
    #[error("{key} = {value} is not allowed: {allowed}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// The value found.
        value: String,
        /// What is allowed instead.
        allowed: &'static str,
    },
}

impl Config {
    /// Parses and validates a config file's text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: String, allowed| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                value,
                allowed,
            })
        };
        if self.device.name.trim().is_empty() || self.device.name.len() > 64 {
            return invalid(
                "device.name",
                format!("{:?}", self.device.name),
                "1 to 64 characters",
            );
        }
        if !(1..=64).contains(&self.scan.hash_threads) {
            return invalid(
                "scan.hash_threads",
                self.scan.hash_threads.to_string(),
                "1 to 64",
            );
        }
        if !(1..=100_000).contains(&self.scan.batch_files) {
            return invalid(
                "scan.batch_files",
                self.scan.batch_files.to_string(),
                "1 to 100000",
            );
        }
        if self.network.listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "network.listen",
                format!("{:?}", self.network.listen),
                "an address and port such as \"0.0.0.0:0\" or \"127.0.0.1:22000\"",
            );
        }
        let relays = self.network.relays.as_str();
        let is_url = relays.starts_with("https://") || relays.starts_with("http://");
        if !(is_url || matches!(relays, "default" | "disabled")) {
            return invalid(
                "network.relays",
                format!("{relays:?}"),
                "\"default\", \"disabled\" or a relay URL (https://…)",
            );
        }
        if self.scan.hold_deletes_percent > 100 {
            return invalid(
                "scan.hold_deletes_percent",
                self.scan.hold_deletes_percent.to_string(),
                "0 to 100",
            );
        }
        if self.sync.debounce_ms > 60_000 {
            return invalid(
                "sync.debounce_ms",
                self.sync.debounce_ms.to_string(),
                "0 to 60000",
            );
        }
        if !(10..=7 * 86_400).contains(&self.sync.rescan_interval_secs) {
            return invalid(
                "sync.rescan_interval_secs",
                self.sync.rescan_interval_secs.to_string(),
                "10 to 604800",
            );
        }
        if !(1..=1024).contains(&self.sync.requests_in_flight) {
            return invalid(
                "sync.requests_in_flight",
                self.sync.requests_in_flight.to_string(),
                "1 to 1024",
            );
        }
        if !(1..=64).contains(&self.sync.parallel_files) {
            return invalid(
                "sync.parallel_files",
                self.sync.parallel_files.to_string(),
                "1 to 64",
            );
        }
        if !(1..=3600).contains(&self.sync.request_timeout_secs) {
            return invalid(
                "sync.request_timeout_secs",
                self.sync.request_timeout_secs.to_string(),
                "1 to 3600",
            );
        }
        if self.database.busy_timeout_ms > 600_000 {
            return invalid(
                "database.busy_timeout_ms",
                self.database.busy_timeout_ms.to_string(),
                "0 to 600000",
            );
        }
        self.validate_history()
    }

    fn validate_history(&self) -> Result<(), ConfigError> {
        let h = &self.history;
        let age = |key: String, days: u32| {
            if days > MAX_AGE_DAYS {
                return Err(ConfigError::Invalid {
                    key,
                    value: days.to_string(),
                    allowed: "0 (forever) to 36500 days",
                });
            }
            Ok(())
        };
        let size = |key: String, mb: u64| {
            if mb > MAX_SIZE_MB {
                return Err(ConfigError::Invalid {
                    key,
                    value: mb.to_string(),
                    allowed: "0 (no cap) to 1073741824 MiB",
                });
            }
            Ok(())
        };
        age("history.max_age_days".into(), h.max_age_days)?;
        size("history.max_size_mb".into(), h.max_size_mb)?;
        for (id, o) in &h.folders {
            let key = toml::Value::String(id.clone());
            if FolderId::new(id).is_err() {
                return Err(ConfigError::Invalid {
                    key: "history.folders".into(),
                    value: key.to_string(),
                    allowed: "folder ids as `ferry folder list` shows them: 1 to 64 of \
                              A-Z a-z 0-9 . _ -, not starting with .",
                });
            }
            if let Some(days) = o.max_age_days {
                age(format!("history.folders.{key}.max_age_days"), days)?;
            }
            if let Some(mb) = o.max_size_mb {
                size(format!("history.folders.{key}.max_size_mb"), mb)?;
            }
        }
        Ok(())
    }

    /// The history policy of a folder: `[history]` with the folder's overrides.
    pub fn history_policy(&self, folder: &FolderId) -> Policy {
        let h = &self.history;
        let o = h.folders.get(folder.as_str()).cloned().unwrap_or_default();
        let days = o.max_age_days.unwrap_or(h.max_age_days);
        let mb = o.max_size_mb.unwrap_or(h.max_size_mb);
        Policy {
            retention: o.retention.unwrap_or(h.retention),
            max_age: (days > 0).then(|| Duration::from_secs(u64::from(days) * 86_400)),
            max_bytes: (mb > 0).then(|| mb.saturating_mul(1 << 20)),
            keep_local: o.local.unwrap_or(h.local),
        }
    }

    /// Which folders keep the versions local edits replace (`history.local`
    /// and its per-folder overrides), for the index.
    pub fn local_history(&self) -> crate::index::LocalHistory {
        crate::index::LocalHistory {
            default: self.history.local,
            folders: self
                .history
                .folders
                .iter()
                .filter_map(|(id, o)| o.local.map(|l| (id.clone(), l)))
                .collect(),
        }
    }

    /// The file `ferry init` writes: every setting with its default and a comment.
    pub fn to_commented_toml(&self) -> String {
        let name = toml::Value::String(self.device.name.clone());
        format!(
            r#"# ferry configuration. Every setting is written out with its default.
# Change one with `ferry config set KEY VALUE` (it checks the value and the
# running agent applies [scan], [sync] and [history] at once; [device],
# [database] and [network] wait for a restart of the agent), or edit this file
# and restart the agent.

[device]
# The name other devices see for this one.
name = {name}

[database]
# How long a command waits for another ferry process's write to the index
# before giving up with "database is locked", in milliseconds.
busy_timeout_ms = {busy}

[scan]
# Files hashed at the same time. Files larger than 2 MiB also use a second core
# each, so 2 keeps a two-core machine busy.
hash_threads = {threads}
# Index changes committed per SQLite transaction during a scan.
batch_files = {batch}
# How often a file that changes while it is being hashed is tried again before
# the scan leaves it for the next one.
changing_retries = {retries}
# A scan that would delete more than this percentage of a folder's entries at
# once (an unmounted or emptied disk?) holds the deletes back, says so in
# `ferry status`, and sends them only after `ferry folder confirm-deletes`.
# 100 turns this off.
hold_deletes_percent = {hold_pct}
# ... but only when that is at least this many entries.
hold_deletes_min = {hold_min}

[network]
# Address and UDP port the agent listens on. Port 0 picks a free port the first
# time and keeps it across restarts.
listen = {listen}
# "default" uses the public relays, which connect devices behind NATs and
# firewalls (traffic through a relay stays end-to-end encrypted); "disabled"
# turns relays off; or give the URL of your own relay.
relays = {relays}
# Publish and look up this device's addresses through internet discovery.
discovery = {discovery}
# Find devices on the local network with mDNS.
local_discovery = {local}
# Ask the router to forward a port (UPnP, NAT-PMP, PCP).
port_mapping = {portmap}

[sync]
# How long the folder watcher lets a burst of changes settle before scanning,
# in milliseconds.
debounce_ms = {debounce}
# A full rescan of every folder runs this often (seconds), as a backstop for
# changes the watcher missed.
rescan_interval_secs = {rescan}
# Chunk requests in flight per folder while pulling.
requests_in_flight = {inflight}
# Files pulled at the same time per folder.
parallel_files = {pfiles}
# How long one request to or from a peer may take (seconds); a peer that
# stalls is given up on after this, and asked last while others can serve.
request_timeout_secs = {reqtimeout}

[history]
# Each device keeps its own copies of the versions that sync replaces or
# deletes, stored once per chunk however many versions share it.
# "staggered" thins them out with age: every version from the last hour, then
# one per hour for a day, one per day for 30 days and one per week after that;
# "keep-all" keeps every version. Nothing from the last hour is ever removed.
retention = {retention}
# Versions older than this many days are removed; 0 keeps them forever.
max_age_days = {max_age}
# Cap on each folder's history, in MiB: over it, the oldest versions go first.
# 0 means no cap.
max_size_mb = {max_size}
# Also keep the versions that local edits replace, as the scanner sees them
# (not only those that sync replaces or deletes).
local = {hlocal}

# Settings for one folder, by folder id: any of the four above, e.g.
# [history.folders."docs"]
# retention = "keep-all"
# max_age_days = 0
{overrides}"#,
            retention = toml::Value::String(self.history.retention.as_str().into()),
            max_age = self.history.max_age_days,
            max_size = self.history.max_size_mb,
            hlocal = self.history.local,
            overrides = self.history_overrides_toml(),
            debounce = self.sync.debounce_ms,
            rescan = self.sync.rescan_interval_secs,
            inflight = self.sync.requests_in_flight,
            pfiles = self.sync.parallel_files,
            reqtimeout = self.sync.request_timeout_secs,
            listen = toml::Value::String(self.network.listen.clone()),
            relays = toml::Value::String(self.network.relays.clone()),
            discovery = self.network.discovery,
            local = self.network.local_discovery,
            portmap = self.network.port_mapping,
            busy = self.database.busy_timeout_ms,
            threads = self.scan.hash_threads,
            batch = self.scan.batch_files,
            retries = self.scan.changing_retries,
            hold_pct = self.scan.hold_deletes_percent,
            hold_min = self.scan.hold_deletes_min,
        )
    }

    /// The `[history.folders."<id>"]` tables, for the commented file.
    fn history_overrides_toml(&self) -> String {
        let mut out = String::new();
        for (id, o) in &self.history.folders {
            out.push_str(&format!(
                "\n[history.folders.{}]\n",
                toml::Value::String(id.clone())
            ));
            if let Some(r) = o.retention {
                out.push_str(&format!(
                    "retention = {}\n",
                    toml::Value::String(r.as_str().into())
                ));
            }
            if let Some(d) = o.max_age_days {
                out.push_str(&format!("max_age_days = {d}\n"));
            }
            if let Some(m) = o.max_size_mb {
                out.push_str(&format!("max_size_mb = {m}\n"));
            }
            if let Some(l) = o.local {
                out.push_str(&format!("local = {l}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commented_file_parses_back_to_the_same_config() {
        let mut c = Config::default();
        c.device.name = "laptop \"one\"".into();
        assert_eq!(Config::from_toml_str(&c.to_commented_toml()).unwrap(), c);
    }

    #[test]
    fn typos_and_bad_values_are_refused_with_the_key() {
        let err = Config::from_toml_str("[scan]\nhash_thread = 2\n").unwrap_err();
        assert!(err.to_string().contains("hash_thread"), "{err}");
        let err = Config::from_toml_str("[scan]\nhash_threads = 0\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "scan.hash_threads = 0 is not allowed: 1 to 64"
        );
    }

    #[test]
    fn history_defaults_to_staggered_for_a_year_without_a_cap() {
        let c = Config::from_toml_str("").unwrap();
        let p = c.history_policy(&FolderId::new("docs").unwrap());
        assert_eq!(p, Policy::default());
        assert_eq!(p.retention, Retention::Staggered);
        assert_eq!(p.max_age, Some(Duration::from_secs(365 * 86_400)));
        assert_eq!(p.max_bytes, None);
        assert!(!p.keep_local);
    }

    #[test]
    fn history_folder_overrides_replace_only_the_keys_they_name() {
        let text = r#"
            [history]
            retention = "keep-all"
            max_age_days = 30
            max_size_mb = 100
            local = true

            [history.folders."photos"]
            retention = "staggered"
            max_age_days = 0

            [history.folders.scratch]
            max_size_mb = 0
            local = false
        "#;
        let c = Config::from_toml_str(text).unwrap();
        let policy = |id| c.history_policy(&FolderId::new(id).unwrap());
        assert_eq!(
            policy("docs"),
            Policy {
                retention: Retention::KeepAll,
                max_age: Some(Duration::from_secs(30 * 86_400)),
                max_bytes: Some(100 << 20),
                keep_local: true,
            }
        );
        assert_eq!(
            policy("photos"),
            Policy {
                retention: Retention::Staggered,
                max_age: None,
                max_bytes: Some(100 << 20),
                keep_local: true,
            }
        );
        assert_eq!(
            policy("scratch"),
            Policy {
                retention: Retention::KeepAll,
                max_age: Some(Duration::from_secs(30 * 86_400)),
                max_bytes: None,
                keep_local: false,
            }
        );
        // The commented file keeps the overrides.
        assert_eq!(Config::from_toml_str(&c.to_commented_toml()).unwrap(), c);
    }

    #[test]
    fn bad_history_values_are_refused_with_what_is_allowed() {
        let err = Config::from_toml_str("[history]\nretention = \"weekly\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("retention") && msg.contains("staggered") && msg.contains("keep-all"),
            "{msg}"
        );
        let err = Config::from_toml_str("[history]\nmax_age_days = 99999\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "history.max_age_days = 99999 is not allowed: 0 (forever) to 36500 days"
        );
        let err = Config::from_toml_str("[history]\nmax_age_days = -1\n").unwrap_err();
        assert!(err.to_string().contains("max_age_days"), "{err}");
        let err = Config::from_toml_str("[history.folders.docs]\nmax_size_mb = 9999999999999\n")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "history.folders.\"docs\".max_size_mb = 9999999999999 is not allowed: \
             0 (no cap) to 1073741824 MiB"
        );
        let err =
            Config::from_toml_str("[history.folders.\".hidden\"]\nlocal = true\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("history.folders = \".hidden\" is not allowed: folder ids"),
            "{err}"
        );
        let err = Config::from_toml_str("[history.folders.docs]\nkeep = 3\n").unwrap_err();
        assert!(err.to_string().contains("keep"), "{err}");
    }
}
