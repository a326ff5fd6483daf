//! Shared formatting for human output: sizes, times, aligned tables.

/// A bar of `total` bytes on stderr, only when stderr is a terminal and the
/// output is not JSON (so no bar bytes reach a pipe, a file or a script).
pub(super) fn byte_bar(total: u64, prefix: &str, json: bool) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_owned());
    Some(bar)
}

/// A spinner with the time elapsed, on stderr, while the agent does a long
/// job it reports only at the end; only on a terminal and without JSON.
pub(super) fn waiting(message: String, json: bool) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .expect("valid template"),
    );
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    Some(bar)
}

/// While the agent runs a long operation of `kind` for this command: the
/// spinner of [`waiting`], which becomes a bar of the operation's bytes as
/// the agent's status reports them. Stops when dropped.
pub(super) struct Follow {
    bar: indicatif::ProgressBar,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Follow {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.poller.take() {
            let _ = t.join();
        }
        self.bar.finish_and_clear();
    }
}

/// Starts a [`Follow`]; `None` off a terminal or with JSON.
pub(super) fn follow(
    home: &std::path::Path,
    kind: &'static str,
    message: String,
    json: bool,
) -> Option<Follow> {
    use crate::daemon::control::{self, Request};
    use std::sync::atomic::Ordering;
    let bar = waiting(message, json)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (home, b, halt) = (home.to_owned(), bar.clone(), stop.clone());
    let poller = std::thread::spawn(move || {
        let mut drawing = false;
        while !halt.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(250));
            let Ok(s) = control::call(&home, &Request::Status, std::time::Duration::from_secs(2))
            else {
                continue;
            };
            let op = s["operations"]
                .as_array()
                .and_then(|ops| ops.iter().find(|o| o["kind"] == kind));
            let (Some(done), Some(total)) = (
                op.and_then(|o| o["done"].as_u64()),
                op.and_then(|o| o["total"].as_u64()),
            ) else {
                continue;
            };
            if total == 0 {
                continue;
            }
            if !drawing {
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({elapsed})",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                drawing = true;
            }
            b.set_length(total);
            b.set_position(done.min(total));
        }
    });
    Some(Follow {
        bar,
        stop,
        poller: Some(poller),
    })
}

/// `1.5 MiB`-style sizes.
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC.
pub(super) fn time(secs: i64) -> String {
    crate::history::time::format_utc(secs)
}

/// Prints rows with each column padded to its widest cell (the last column is
/// not padded).
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut out = String::new();
        for (i, (cell, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i + 1 == n {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes_and_times() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_795_000_000), "2026-11-18 11:06:40");
        assert_eq!(time(951_782_400), "2000-02-29 00:00:00");
    }
}
