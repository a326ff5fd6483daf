//! The command line: argument definitions, dispatch, and error reporting. One
//! file per user action; each prints human output or, with `--json`, JSON.

mod agent;
mod completions;
mod config;
mod conflicts;
mod doctor;
mod folder;
mod folder_key;
mod history;
mod init;
mod ls;
mod output;
mod resolve;
mod restore;
mod scan;
mod status;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::home::{self, Home};

/// Exit code for success.
pub const EXIT_OK: i32 = 0;
/// Exit code for an error (usage errors exit with 2, from clap).
pub const EXIT_ERROR: i32 = 1;
/// Exit code when a command needs the agent and it is not running.
pub const EXIT_NO_AGENT: i32 = 3;

/// ferry: encrypted peer-to-peer folder sync.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, propagate_version = true)]
pub struct Cli {
    /// The device home (key, config, index). Default: the platform data
    /// directory, e.g. ~/.local/share/ferry.
    #[arg(long, global = true, env = "FERRY_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    pub log_level: String,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the device home: a new device key, a commented config, the index.
    Init {
        /// The name other devices see (default: the host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Print this device's id.
    Id,
    /// Add, list or remove synced folders.
    #[command(subcommand)]
    Folder(folder::FolderCommand),
    /// Read or change settings (config.toml) by dotted key.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Run the background agent in the foreground (until SIGINT/SIGTERM).
    Daemon {
        /// Turn off relays, internet discovery and port mapping (LANs, tests).
        #[arg(long)]
        offline: bool,
        /// Listen on this address and UDP port instead of `network.listen`.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Make a one-time code that pairs another device with this one.
    Invite {
        /// Also share this folder with the device that joins.
        #[arg(long)]
        folder: Option<String>,
        /// The device that joins holds the folder as an encrypted backup: it
        /// stores and serves it but can read none of it.
        #[arg(long, requires = "folder")]
        encrypted: bool,
        /// How long the code stays valid (90s, 10m, 2h, 7d).
        #[arg(long, default_value = "10m", value_parser = agent::parse_duration)]
        expires: u64,
    },
    /// Pair with the device that printed CODE (`ferry invite` there).
    Join {
        /// The invite code.
        code: String,
        /// Where to put the folder the invite shares.
        #[arg(long)]
        into: Option<PathBuf>,
        /// A name for the inviting device in this device's list.
        #[arg(long)]
        name: Option<String>,
        /// The shared folder's type on this device: send-receive, send-only or
        /// receive-only.
        #[arg(long = "type", default_value = "send-receive", value_parser = folder::parse_type)]
        folder_type: crate::folder::FolderType,
    },
    /// List paired devices and their links.
    Devices {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage a paired device.
    #[command(subcommand)]
    Device(agent::DeviceCommand),
    /// Offer a folder to a paired device.
    Share {
        /// The folder id.
        folder: String,
        /// The device id.
        device: String,
        /// The device holds the folder as an encrypted backup: it stores and
        /// serves it but can read none of it (it accepts with `ferry folder
        /// accept`).
        #[arg(long)]
        encrypted: bool,
    },
    /// Rebuild a folder from a device that holds it encrypted, with the
    /// folder's recovery code (`ferry folder key` on a device that had it).
    Recover {
        /// The holder: a paired device's id or name, or an invite code made on
        /// the holder (`ferry invite` there) to pair with it first.
        #[arg(long)]
        from: String,
        /// The recovery code.
        #[arg(long)]
        key: String,
        /// Where to put the folder (a new or empty directory).
        #[arg(long)]
        into: PathBuf,
        /// The folder as it was at this time, from the versions the holder
        /// keeps: YYYY-MM-DD (HH:MM or HH:MM:SS may follow) in UTC, RFC 3339, or @UNIX-SECONDS.
        #[arg(long, value_name = "TIME", value_parser = crate::history::time::parse_utc)]
        at: Option<i64>,
    },
    /// Walk folders and record what changed in the index.
    Scan {
        /// Only this folder (default: all).
        folder: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show every folder's state and totals, the agent and its peers.
    Status {
        /// List every item of FOLDER not in sync yet, with the reason.
        #[arg(long, value_name = "FOLDER")]
        need: Option<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        /// Keep showing it, refreshed every --interval seconds (redrawn on a
        /// terminal, a new block each time otherwise) until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, value_name = "SECS", default_value_t = 2, requires = "watch",
              value_parser = clap::value_parser!(u64).range(1..=86_400))]
        interval: u64,
    },
    /// Undo local changes in a receive-only folder: put back the synced state
    /// (the local versions go to the history).
    Revert {
        /// The folder id.
        folder: String,
    },
    /// List the conflicts found (concurrent edits kept as conflict copies).
    Conflicts {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the versions kept of a file, newest first (the current one on
    /// top); or prune, verify or total the history.
    History(history::HistoryArgs),
    /// Put an earlier version of a file back (by default the newest kept), in
    /// place (a new change that syncs; what it replaces is kept) or --to DEST.
    #[command(disable_version_flag = true)]
    Restore {
        /// A file, or with --recursive a directory, in a synced folder: a path
        /// on disk, or FOLDER:PATH (FOLDER: for the whole folder).
        path: String,
        /// The version to restore (an id from `ferry history`).
        #[arg(long, conflicts_with = "at")]
        version: Option<i64>,
        /// Restore what was current at this time: YYYY-MM-DD (HH:MM or HH:MM:SS may follow) in
        /// UTC, RFC 3339 (2024-05-01T14:30:00+02:00), or @UNIX-SECONDS.
        #[arg(long, value_name = "TIME", value_parser = crate::history::time::parse_utc)]
        at: Option<i64>,
        /// Write it to DEST instead (a file; with --recursive a directory).
        #[arg(long, value_name = "DEST")]
        to: Option<PathBuf>,
        /// Replace DEST if it exists.
        #[arg(long, requires = "to")]
        force: bool,
        /// Restore the whole tree below PATH as it was at --at TIME, deleted
        /// files included (files made or changed since, without a version
        /// from then, are left as they are).
        #[arg(long, short = 'r', requires = "at")]
        recursive: bool,
        /// Fetch --version ID from the history this connected device (id or
        /// name) keeps, as `ferry history` lists it (needs the agent).
        #[arg(long, value_name = "DEVICE", requires = "version", conflicts_with_all = ["at", "recursive"])]
        from: Option<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve an open conflict: keep this device's version, the other's,
    /// both, or a version from the history.
    Resolve {
        /// The conflicting file (or its conflict copy): a path on disk, or
        /// FOLDER:PATH.
        path: String,
        /// local, remote, both, or a version id from `ferry history`.
        #[arg(long, value_name = "local|remote|both|VERSION")]
        keep: crate::history::resolve::Keep,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the home, the index, every folder, the agent and the links to
    /// paired devices; say what to do about each problem (exit 1 if any).
    Doctor {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List what the index holds for the files of a folder.
    Ls {
        /// The folder id.
        folder: String,
        /// Only this path and what is below it.
        path: Option<String>,
        /// Include deleted files (tombstones).
        #[arg(long)]
        deleted: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the shell completion script for bash, zsh or fish.
    Completions(completions::CompletionsArgs),
    /// Print the man page, or write one per command into --dir.
    Man(completions::ManArgs),
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    init_logging(&cli.log_level);
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {}", one_line(&e));
            match e.downcast_ref::<crate::daemon::control::ControlError>() {
                Some(crate::daemon::control::ControlError::NotRunning(_)) => EXIT_NO_AGENT,
                _ => EXIT_ERROR,
            }
        }
    }
}

/// The error and its causes, each cause shown once: library errors often repeat
/// their source in their own message.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// Logs go to stderr through tracing, at `RUST_LOG` or else `--log-level`.
/// On a terminal: coloured, with timestamps. Otherwise (a pipe, a file,
/// journald): plain lines without escape codes and without timestamps, since
/// whatever collects them adds its own; `FERRY_LOG_TIMESTAMPS=1` puts them
/// back.
fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let terminal = std::io::stderr().is_terminal();
    let colour = terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let timestamps = terminal || std::env::var("FERRY_LOG_TIMESTAMPS").is_ok_and(|v| v == "1");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    let _ = if timestamps {
        builder.try_init()
    } else {
        builder.without_time().try_init()
    };
}

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    // These need no device home: they run before one is even looked for.
    let command = match cli.command {
        Command::Completions(args) => return completions::completions(args),
        Command::Man(args) => return completions::man(args),
        command => command,
    };
    let root = home::resolve(cli.home)?;
    match command {
        Command::Init { name } => init::run(&root, name.as_deref()),
        Command::Id => {
            println!("{}", Home::open(&root)?.device_id());
            Ok(EXIT_OK)
        }
        Command::Folder(cmd) => folder::run(&Home::open(&root)?, cmd),
        Command::Config(cmd) => config::run(&root, cmd),
        Command::Doctor { json } => doctor::run(&root, json),
        Command::Daemon { offline, listen } => agent::daemon(&Home::open(&root)?, offline, listen),
        Command::Invite {
            folder,
            encrypted,
            expires,
        } => agent::invite(&Home::open(&root)?, folder, encrypted, expires),
        Command::Join {
            code,
            into,
            name,
            folder_type,
        } => agent::join(&Home::open(&root)?, &code, into, name, folder_type),
        Command::Devices { json } => agent::devices(&Home::open(&root)?, json),
        Command::Device(cmd) => agent::device(&Home::open(&root)?, cmd),
        Command::Share {
            folder,
            device,
            encrypted,
        } => agent::share(&Home::open(&root)?, &folder, &device, encrypted),
        Command::Recover {
            from,
            key,
            into,
            at,
        } => agent::recover(&Home::open(&root)?, &from, &key, &into, at),
        Command::Scan { folder, json } => scan::run(&Home::open(&root)?, folder.as_deref(), json),
        Command::Status {
            need,
            json,
            watch: true,
            interval,
        } => status::watch(
            &Home::open(&root)?,
            need.as_deref(),
            json,
            std::time::Duration::from_secs(interval),
        ),
        Command::Status {
            need: None, json, ..
        } => status::run(&Home::open(&root)?, json),
        Command::Status {
            need: Some(folder),
            json,
            ..
        } => status::need(&Home::open(&root)?, &folder, json),
        Command::Conflicts { json } => conflicts::run(&Home::open(&root)?, json),
        Command::Revert { folder } => {
            let home = Home::open(&root)?;
            crate::daemon::control::call(
                home.root(),
                &crate::daemon::control::Request::Revert {
                    folder: folder.clone(),
                },
                std::time::Duration::from_secs(10),
            )?;
            println!(
                "Reverting local changes in {folder}: the synced versions come back shortly (`ferry status`)."
            );
            Ok(EXIT_OK)
        }
        Command::History(args) => history::run(&Home::open(&root)?, args),
        Command::Restore {
            path,
            version,
            at,
            to,
            force,
            recursive,
            from,
            json,
        } => restore::run(
            &Home::open(&root)?,
            restore::RestoreArgs {
                path,
                version,
                at,
                to,
                force,
                recursive,
                from,
                json,
            },
        ),
        Command::Resolve { path, keep, json } => {
            resolve::run(&Home::open(&root)?, &path, keep, json)
        }
        Command::Ls {
            folder,
            path,
            deleted,
            json,
        } => ls::run(&Home::open(&root)?, &folder, path.as_deref(), deleted, json),
        Command::Completions(_) | Command::Man(_) => unreachable!("handled before the home"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
