//! `ferry completions SHELL` and `ferry man [--dir DIR]`: the shell completion
//! scripts and the roff man pages, generated from the command line definition
//! so they never drift from it. Neither needs, opens or creates a device home:
//! packagers run them at build time on a machine that has none.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::{Cli, EXIT_OK};

/// `ferry completions SHELL`
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish (also elvish, powershell).
    #[arg(value_enum)]
    pub shell: Shell,
}

/// `ferry man [--dir DIR]`
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write `ferry.1` and one page per subcommand (`ferry-status.1`, …) into
    /// DIR (created if missing) instead of printing `ferry.1`.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Prints the completion script for `args.shell` to stdout.
pub(super) fn completions(args: CompletionsArgs) -> anyhow::Result<i32> {
    // Generated into memory first: clap_complete panics on a failed write, and
    // a full disk or closed stdout deserves an error message instead.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "ferry", &mut script);
    write_stdout(&script)?;
    Ok(EXIT_OK)
}

/// Prints `ferry.1` to stdout, or with `--dir` writes every page into DIR and
/// prints their paths.
pub(super) fn man(args: ManArgs) -> anyhow::Result<i32> {
    match args.dir {
        None => {
            let mut roff = Vec::new();
            let mut cmd = command();
            cmd.build();
            page(cmd)
                .render(&mut roff)
                .context("cannot render the man page")?;
            write_stdout(&roff)?;
        }
        Some(dir) => {
            for path in write_pages(&dir)? {
                println!("{}", path.display());
            }
        }
    }
    Ok(EXIT_OK)
}

/// The command as the man pages show it: without clap's `help` subcommand,
/// which `--help` already covers and which needs no page of its own.
fn command() -> clap::Command {
    Cli::command().disable_help_subcommand(true)
}

/// The roff page of a built command, titled in capitals as man pages are
/// (`.TH FERRY-STATUS 1`), every page's footer naming ferry and its version.
fn page(cmd: clap::Command) -> clap_mangen::Man {
    let title = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_uppercase();
    clap_mangen::Man::new(cmd)
        .title(title)
        .source(concat!("ferry ", env!("CARGO_PKG_VERSION")))
}

/// Writes `ferry.1` and a page per subcommand, nested ones included
/// (`ferry-folder-add.1`), into `dir`; returns the paths written, sorted.
fn write_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    // Built, the command and its subcommands carry their full names
    // (`ferry-folder-add`), which name the pages.
    let mut cmd = command();
    cmd.build();
    let mut pages = Vec::new();
    write_tree(cmd, dir, &mut pages)
        .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
    pages.sort();
    Ok(pages)
}

fn write_tree(cmd: clap::Command, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_tree(sub.clone(), dir, out)?;
    }
    out.push(page(cmd).generate_to(dir)?);
    Ok(())
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .context("cannot write to standard output")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_listed_is_written_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let listed = write_pages(dir.path()).unwrap();
        let mut on_disk: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        on_disk.sort();
        assert_eq!(listed, on_disk);
        assert!(listed.contains(&dir.path().join("ferry-folder-add.1")));
        assert!(!listed.contains(&dir.path().join("ferry-help.1")));
    }
}
