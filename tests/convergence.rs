//! Seeded, randomized convergence of three devices: real agents on loopback
//! sharing one folder in a full mesh, and a run of random edits on random
//! devices — files made (now and then a few hundred KB), overwritten, appended
//! to, bytes inserted in the middle, truncated (shorter, or to nothing),
//! renamed (into other directories too) and deleted, the same file written on
//! two devices at once (a real conflict), directories made and removed — while
//! agents are stopped and started again now and then (never all three at once),
//! or frozen with SIGSTOP for 0.5–5 s and woken with SIGCONT (a laptop's lid
//! closed: its peers' links stall and time out while the others go on editing;
//! nobody edits on it meanwhile), and the pace varies, so that some edits race
//! each other and some do not. Afterwards, with every agent running, all three
//! devices must come to hold the same tree (contents, permissions, mtimes) and
//! stay so; every conflict copy must be a plain file holding a content the run
//! wrote, no device may still need anything (`ferry status --json`:
//! `need_items` is 0 for the folder, and for each of its peers), no
//! `.ferry-tmp-*` temp file may be left, and every device's history must
//! verify.
//!
//! ## No version lost
//!
//! Every device keeps local versions (`history.local = true`, retention
//! `keep-all`), and the test keeps a model of each content it wrote: its
//! blake3 hash, path, device and operation number. After convergence every
//! content ferry *must* have kept has to be found as a current file on some
//! device (a conflict copy is one), or as a version in some device's history
//! (`ferry history docs: --json`, the `hash` of each version). The rule for
//! which contents ferry must keep:
//!
//! - A content counts once the test has seen its device's index record it at
//!   its path (`ferry ls docs PATH --json` shows its hash): before that ferry
//!   never knew it. The test looks between operations (one `ferry ls` per
//!   device with contents still unseen) and waits before it touches the path
//!   again on that device.
//! - A local edit or delete keeps the version it replaces only if the agent
//!   has read its bytes into the history store first (shortly after the scan
//!   that recorded it: `ls` says `stored`); one replaced sooner is gone by
//!   design (`history::local`). So before any operation touches a file on a
//!   device whose agent runs, if the file holds a content the run wrote
//!   (written there, or moved there by sync: a conflict copy, a rename), the
//!   test waits until that device has recorded and stored it, or sync
//!   replaced it (a pull sets the version it replaces aside in the history
//!   without needing it stored, and is refused while the file differs from
//!   what the index saw).
//! - Hence the exclusions, each counted and printed: a content the test
//!   replaced on a device whose agent was stopped or frozen, unless that
//!   stopped agent's index says it is stored there (the agent did not run to
//!   keep it: a user's own overwrite; the content is excused everywhere,
//!   since other devices may have lost their copies the same way), and a
//!   content that left its path before the test ever saw it recorded (e.g.
//!   an append through a file descriptor whose file a pull had just replaced
//!   wrote to a file no longer in the folder, which no sync tool could see).
//!   Everything else — replaced by a pull, deleted by a peer, lost a
//!   conflict, renamed, deleted or edited locally once stored — must survive.
//!
//! A content missing fails the run with the seed, its path, device and
//! operation number, and the journal.
//!
//! Every run prints its seed and op count first, and on failure the seed, the
//! paths that differ and the operations it did (after the agents' logs). Replay
//! a run with
//!
//! ```sh
//! FERRY_CONVERGENCE_SEED=20261123 FERRY_CONVERGENCE_OPS=120 cargo test --test convergence -- --nocapture
//! ```
//!
//! (`FERRY_CONVERGENCE_SEED` takes decimal or `0x` hex.) A seed fixes every
//! choice the test makes, but what an operation finds on a device depends on
//! how far the agents have synced, so a replay takes the same path only as far
//! as the agents keep the same pace; the journal printed on failure says what
//! actually happened.
//!
//! Temp files: the test found that pulls given up (refused at placement, or
//! failed part-way for a version later superseded) left their temp files in
//! the folder, never synced, so trees differed by them; the engine now removes
//! them once no pull needs them, and any left over fails the run.
//!
//! The long run, ignored by default, does the same with 10,000 operations:
//!
//! ```sh
//! FERRY_CONVERGENCE_OPS=10000 cargo test --release --test convergence -- --ignored
//! ```

#[path = "common/agent.rs"]
mod agent;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::{Agent, Lab, Node, PATIENCE, Rng, env_number, pair, pseudo_random, tree, wait_until};
use serde_json::Value;

/// The seed when `FERRY_CONVERGENCE_SEED` is not set.
const DEFAULT_SEED: u64 = 20_261_123;
/// Operations in the default run when `FERRY_CONVERGENCE_OPS` is not set.
const DEFAULT_OPS: u64 = 150;
/// Operations in the long run when `FERRY_CONVERGENCE_OPS` is not set.
const LONG_RUN_OPS: u64 = 10_000;
/// The folder every device shares.
const FOLDER: &str = "docs";
/// How long the converged state must hold before it counts: longer than the
/// watcher's debounce and a round trip between agents, so an edit still on
/// its way shows up.
const SETTLE: Duration = Duration::from_secs(2);
/// The most journal lines printed on failure (the newest).
const JOURNAL_TAIL: usize = 600;

/// What the random operations are, and how often each is drawn (out of the
/// sum of the weights).
const MIX: &[(Op, u64)] = &[
    (Op::Create, 20),
    (Op::Overwrite, 11),
    (Op::Append, 9),
    (Op::Insert, 8),
    (Op::Truncate, 7),
    (Op::Rename, 12),
    (Op::Delete, 10),
    (Op::MakeDir, 8),
    (Op::RemoveDir, 7),
    (Op::EditOnTwo, 5),
    (Op::StopAgent, 4),
    (Op::Sleep, 4),
];

/// One kind of random operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// A new file with random content.
    Create,
    /// New content for an existing file.
    Overwrite,
    /// A few bytes more at the end of an existing file.
    Append,
    /// A few bytes inserted somewhere in the middle of an existing file.
    Insert,
    /// An existing file cut shorter, or to nothing.
    Truncate,
    /// An existing file under another name, perhaps in another directory.
    Rename,
    /// An existing file removed.
    Delete,
    /// A new directory.
    MakeDir,
    /// An empty directory removed.
    RemoveDir,
    /// One path written with different contents on two devices at once.
    EditOnTwo,
    /// The device's agent stopped, to start again a few operations later.
    StopAgent,
    /// The device's agent frozen (SIGSTOP) for 0.5–5 s, then woken.
    Sleep,
}

/// An operation drawn from [`MIX`].
fn draw_op(rng: &mut Rng) -> Op {
    let total: u64 = MIX.iter().map(|(_, w)| w).sum();
    let mut x = rng.below(total);
    for &(op, w) in MIX {
        if x < w {
            return op;
        }
        x -= w;
    }
    unreachable!("the weights add up to {total}")
}

/// What the run did, one line per operation; printed with the seed if the
/// test fails (declared before the lab, so after the agents' logs).
struct Journal {
    seed: u64,
    ops: u64,
    lines: Vec<String>,
}

impl Journal {
    fn note(&mut self, line: String) {
        self.lines.push(line);
    }

    fn replay(&self) -> String {
        format!(
            "FERRY_CONVERGENCE_SEED={} FERRY_CONVERGENCE_OPS={} cargo test --test convergence",
            self.seed, self.ops
        )
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let skip = self.lines.len().saturating_sub(JOURNAL_TAIL);
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "===== convergence journal: seed {} ops {} ({} lines, the last {} shown) =====",
            self.seed,
            self.ops,
            self.lines.len(),
            self.lines.len() - skip
        );
        for line in &self.lines[skip..] {
            let _ = writeln!(err, "{line}");
        }
        let _ = writeln!(
            err,
            "===== failed with seed {}; replay: {} =====",
            self.seed,
            self.replay()
        );
    }
}

/// One device of the run: its node, its folder, and its agent while it runs.
struct Device {
    node: Node,
    root: PathBuf,
    agent: Option<Agent>,
    /// While the agent is stopped: the operation at which it starts again.
    back_at: u64,
    /// While the agent is frozen: when it is woken.
    asleep_until: Option<Instant>,
}

impl Device {
    /// Whether its agent runs and is not frozen.
    fn awake(&self) -> bool {
        self.agent.is_some() && self.asleep_until.is_none()
    }
}

/// Files and directories below `root` (relative paths, `/`-separated, sorted),
/// leaving out the `.ferry` marker and `.ferry-tmp-*` temp files. Entries
/// that vanish while it reads (the agent is busy) are left out too.
fn listing(root: &Path) -> (Vec<String>, Vec<String>) {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(root.join(&dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (dir.is_empty() && name == ".ferry") || name.starts_with(".ferry-tmp") {
                continue;
            }
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            match e.file_type() {
                Ok(t) if t.is_dir() => {
                    stack.push(rel.clone());
                    dirs.push(rel);
                }
                Ok(t) if t.is_file() => files.push(rel),
                _ => {}
            }
        }
    }
    files.sort();
    dirs.sort();
    (files, dirs)
}

/// `dir/name`, or `name` at the root (`dir` empty).
fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// How deep a directory is (the root is 0).
fn depth(dir: &str) -> usize {
    if dir.is_empty() {
        0
    } else {
        dir.split('/').count()
    }
}

/// A file name from a small pool, so that devices often pick the same name.
fn file_name(rng: &mut Rng) -> String {
    let stem = *rng.pick(&["notes", "data", "photo"]).expect("stems");
    let ext = *rng.pick(&["txt", "bin"]).expect("extensions");
    format!("{stem}{}.{ext}", rng.below(6))
}

/// Random content of at least one byte (so a conflict copy is never empty):
/// mostly small, sometimes tens of KB, now and then a few hundred KB.
fn content(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(100) {
        0..=69 => rng.between(1, 1_999),
        70..=93 => rng.between(2_000, 63_999),
        _ => rng.between(100_000, 599_999),
    };
    pseudo_random(len as usize, rng.next())
}

/// What an operation did: a line for the journal, and the contents it left
/// in files (path, bytes), for the model.
struct Applied {
    what: String,
    wrote: Vec<(String, Vec<u8>)>,
}

/// `Ok` with what `what` wrote if `r` succeeded, else why `what` failed.
fn io(what: String, r: std::io::Result<Vec<(String, Vec<u8>)>>) -> Result<Applied, String> {
    match r {
        Ok(wrote) => Ok(Applied { what, wrote }),
        Err(e) => Err(format!("{what} failed: {e}")),
    }
}

/// Opens `path` to read and write, reads it whole and lets `edit` change it
/// through the same descriptor: the bytes the file then holds are exactly
/// what `edit` returns, even if a pull renamed another file over the path
/// meanwhile (the edit then went to a file no longer in the folder, which
/// the model finds out: see the module doc).
fn edit_in_place(
    path: &Path,
    edit: impl FnOnce(&mut fs::File, Vec<u8>) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Vec<u8>> {
    let mut f = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut old = Vec::new();
    f.read_to_end(&mut old)?;
    edit(&mut f, old)
}

/// Writes `data` over the file at `path` (made if missing), in place.
fn write_over(path: &Path, data: &[u8]) -> std::io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?
        .write_all(data)
}

/// Applies a folder operation `op` to the folder at `root`, calling `settle`
/// with each existing file's path before it touches it: `Ok` says what it
/// did and wrote, `Err` why it was skipped (its precondition failed, or what
/// it worked on changed under it as the agent synced).
fn apply(
    op: Op,
    root: &Path,
    rng: &mut Rng,
    settle: &mut dyn FnMut(&str),
) -> Result<Applied, String> {
    let (files, dirs) = listing(root);
    let mut all_dirs = vec![String::new()];
    all_dirs.extend(dirs.iter().cloned());
    match op {
        Op::Create => {
            let dir = rng.pick(&all_dirs).expect("the root").clone();
            let rel = join(&dir, &file_name(rng));
            if root.join(&rel).exists() {
                return Err(format!("create {rel}: it exists"));
            }
            let data = content(rng);
            let what = format!("create {rel} ({} bytes)", data.len());
            let r = fs::write(root.join(&rel), &data).map(|()| vec![(rel, data)]);
            io(what, r)
        }
        Op::Overwrite => {
            let rel = rng.pick(&files).ok_or("overwrite: no file")?.clone();
            let data = content(rng);
            let what = format!("overwrite {rel} ({} bytes)", data.len());
            settle(&rel);
            let r = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(root.join(&rel))
                .and_then(|mut f| f.write_all(&data))
                .map(|()| vec![(rel, data)]);
            io(what, r)
        }
        Op::Append => {
            let rel = rng.pick(&files).ok_or("append: no file")?.clone();
            let data = pseudo_random(rng.between(1, 299) as usize, rng.next());
            let what = format!("append {} bytes to {rel}", data.len());
            settle(&rel);
            let r = edit_in_place(&root.join(&rel), |f, mut old| {
                f.write_all(&data)?;
                old.extend_from_slice(&data);
                Ok(old)
            })
            .map(|now| vec![(rel, now)]);
            io(what, r)
        }
        Op::Insert => {
            let rel = rng.pick(&files).ok_or("insert: no file")?.clone();
            let data = pseudo_random(rng.between(1, 4_999) as usize, rng.next());
            let at = rng.next();
            let what = format!("insert {} bytes into {rel}", data.len());
            settle(&rel);
            let r = edit_in_place(&root.join(&rel), |f, old| {
                let at = (at % (old.len() as u64 + 1)) as usize;
                let mut now = old[..at].to_vec();
                now.extend_from_slice(&data);
                now.extend_from_slice(&old[at..]);
                f.seek(SeekFrom::Start(at as u64))?;
                f.write_all(&now[at..])?;
                Ok(now)
            })
            .map(|now| vec![(rel, now)]);
            io(what, r)
        }
        Op::Truncate => {
            let rel = rng.pick(&files).ok_or("truncate: no file")?.clone();
            let to_zero = rng.percent(30);
            let cut = rng.next();
            let what = format!(
                "truncate {rel} to {}",
                if to_zero {
                    "nothing"
                } else {
                    "a shorter length"
                }
            );
            settle(&rel);
            let r = edit_in_place(&root.join(&rel), |f, mut old| {
                let len = if to_zero || old.len() < 2 {
                    0
                } else {
                    1 + (cut % (old.len() as u64 - 1)) as usize
                };
                f.set_len(len as u64)?;
                old.truncate(len);
                Ok(old)
            })
            .map(|now| vec![(rel, now)]);
            io(what, r)
        }
        Op::Rename => {
            let from = rng.pick(&files).ok_or("rename: no file")?.clone();
            let dir = rng.pick(&all_dirs).expect("the root").clone();
            let name = if rng.percent(50) {
                from.rsplit('/').next().expect("a name").to_owned()
            } else {
                file_name(rng)
            };
            let to = join(&dir, &name);
            if root.join(&to).exists() {
                return Err(format!("rename {from} -> {to}: the target exists"));
            }
            let what = format!("rename {from} -> {to}");
            settle(&from);
            let r = fs::rename(root.join(&from), root.join(&to)).map(|()| Vec::new());
            io(what, r)
        }
        Op::Delete => {
            let rel = rng.pick(&files).ok_or("delete: no file")?.clone();
            settle(&rel);
            let r = fs::remove_file(root.join(&rel)).map(|()| Vec::new());
            io(format!("delete {rel}"), r)
        }
        Op::MakeDir => {
            let parents: Vec<String> = all_dirs.iter().filter(|d| depth(d) < 3).cloned().collect();
            let parent = rng.pick(&parents).expect("the root").clone();
            let rel = join(&parent, &format!("dir{}", rng.below(4)));
            if root.join(&rel).exists() {
                return Err(format!("mkdir {rel}: it exists"));
            }
            let r = fs::create_dir(root.join(&rel)).map(|()| Vec::new());
            io(format!("mkdir {rel}"), r)
        }
        Op::RemoveDir => {
            let empty: Vec<String> = dirs
                .iter()
                .filter(|d| fs::read_dir(root.join(d)).is_ok_and(|mut r| r.next().is_none()))
                .cloned()
                .collect();
            let rel = rng.pick(&empty).ok_or("rmdir: no empty directory")?.clone();
            let r = fs::remove_dir(root.join(&rel)).map(|()| Vec::new());
            io(format!("rmdir {rel}"), r)
        }
        Op::EditOnTwo | Op::StopAgent | Op::Sleep => {
            unreachable!("{op:?} is not an operation on one folder")
        }
    }
}

/// What became of a content the run wrote (module doc: the rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Not settled yet; `seen`: its device's index has recorded it.
    Pending { seen: bool },
    /// Ferry must keep it: recorded and stored before the test touched it
    /// again, or recorded and then moved by sync.
    Kept,
    /// Replaced by the test on a device whose agent was stopped or frozen
    /// before it was stored there (there or, by hash, anywhere).
    ReplacedWhileDown,
    /// Gone from its path before the test saw its device record it.
    Unseen,
}

/// A content the run wrote.
struct Content {
    /// Its blake3 hash, hex.
    hash: String,
    len: usize,
    path: String,
    device: usize,
    op: u64,
    fate: Fate,
}

/// The contents the run wrote, and per device and path the one still
/// pending there.
#[derive(Default)]
struct Model {
    contents: Vec<Content>,
    pending: BTreeMap<(usize, String), usize>,
    /// The hashes of every content written.
    hashes: BTreeSet<String>,
    /// Hashes of contents the test replaced on a device whose agent was down
    /// before it had stored them there.
    excused: BTreeSet<String>,
}

/// The blake3 hash (hex) of the file at `path`, `None` if it cannot be read.
fn disk_hash(path: &Path) -> Option<String> {
    fs::read(path)
        .ok()
        .map(|b| blake3::hash(&b).to_hex().to_string())
}

/// `ferry ls FOLDER [PATH] --json` on `node`, by path.
fn index_entries(node: &Node, path: Option<&str>) -> BTreeMap<String, Value> {
    let mut args = vec!["ls", FOLDER];
    args.extend(path);
    args.push("--json");
    let run = node.run(&args).ok();
    run.json()
        .as_array()
        .unwrap_or_else(|| panic!("ls is not an array: {run}"))
        .iter()
        .filter_map(|e| Some((e["path"].as_str()?.to_owned(), e.clone())))
        .collect()
}

impl Model {
    /// Notes that device `device` wrote `bytes` to `path` at operation `op`.
    fn wrote(&mut self, device: usize, path: String, bytes: &[u8], op: u64) {
        let id = self.contents.len();
        let hash = blake3::hash(bytes).to_hex().to_string();
        self.hashes.insert(hash.clone());
        self.contents.push(Content {
            hash,
            len: bytes.len(),
            path: path.clone(),
            device,
            op,
            fate: Fate::Pending { seen: false },
        });
        // What was pending there had left the path already (the test made
        // the file anew), or it would have been settled before the write.
        if let Some(old) = self.pending.insert((device, path), id) {
            self.gone(old);
        }
    }

    /// Content `id` left its path on its device without the test touching
    /// it (sync moved it): kept if the index had recorded it.
    fn gone(&mut self, id: usize) {
        let c = &mut self.contents[id];
        c.fate = match c.fate {
            Fate::Pending { seen: true } => Fate::Kept,
            _ => Fate::Unseen,
        };
    }

    /// Updates the contents pending on `device` (at `root`) from what its
    /// index holds (`entries`, by path).
    fn observe(&mut self, device: usize, root: &Path, entries: &BTreeMap<String, Value>) {
        let here: Vec<(String, usize)> = self
            .pending
            .iter()
            .filter(|((d, _), _)| *d == device)
            .map(|((_, p), id)| (p.clone(), *id))
            .collect();
        for (path, id) in here {
            let c = &mut self.contents[id];
            match entries.get(&path) {
                Some(e) if e["hash"] == c.hash.as_str() && e["deleted"] == false => {
                    if e["stored"] == true {
                        c.fate = Fate::Kept;
                        self.pending.remove(&(device, path));
                    } else {
                        c.fate = Fate::Pending { seen: true };
                    }
                }
                _ => {
                    if disk_hash(&root.join(&path)).as_deref() != Some(c.hash.as_str()) {
                        self.pending.remove(&(device, path));
                        self.gone(id);
                    }
                }
            }
        }
    }

    /// Before the test touches `path` on `dev` (device number `device`):
    /// if the file there holds a content the run wrote (there, or moved
    /// there by sync: a conflict copy, a rename), waits until the device has
    /// recorded and stored it, or sync replaced it (then looks again at what
    /// replaced it). Where the agent does not run, the content is about to
    /// be replaced unkept there: it is excused (module doc).
    #[track_caller]
    fn settle(&mut self, dev: &Device, device: usize, path: &str) {
        let key = (device, path.to_owned());
        let file = dev.root.join(path);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let on_disk = disk_hash(&file);
            // A frozen agent may hold its index: only the others are read.
            let entries =
                (dev.agent.is_none() || dev.awake()).then(|| index_entries(&dev.node, Some(path)));
            if let Some(entries) = &entries {
                self.observe(device, &dev.root, entries);
            }
            let Some(hash) = on_disk.filter(|h| self.hashes.contains(h)) else {
                break;
            };
            let stored = entries.as_ref().and_then(|e| e.get(path)).is_some_and(|e| {
                e["hash"] == hash.as_str() && e["deleted"] == false && e["stored"] == true
            });
            if stored {
                break;
            }
            if !dev.awake() {
                self.excused.insert(hash);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "gave up after {PATIENCE:?} waiting until {} records and stores {path} \
                 (blake3 {hash}) before the test touches it",
                dev.node.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // What the test wrote here and is still pending is replaced now.
        if let Some(id) = self.pending.remove(&key) {
            if disk_hash(&file).as_deref() == Some(self.contents[id].hash.as_str()) {
                self.contents[id].fate = Fate::ReplacedWhileDown;
            } else {
                self.gone(id);
            }
        }
    }

    /// Excludes the contents ferry could not keep ([`Model::excused`]):
    /// kept ones whose hash was replaced unstored on a device that was down.
    fn excuse(&mut self) {
        for c in &mut self.contents {
            if c.fate == Fate::Kept && self.excused.contains(&c.hash) {
                c.fate = Fate::ReplacedWhileDown;
            }
        }
    }

    /// How many contents have each fate.
    fn count(&self, fate: Fate) -> usize {
        self.contents.iter().filter(|c| c.fate == fate).count()
    }
}

/// The folder's entry in `ferry status --json` of `node`, whose agent runs.
#[track_caller]
fn folder_status(node: &Node) -> Value {
    let s = node.status();
    assert!(
        !s["agent"].is_null(),
        "the agent of {} is not running: {s}",
        node.name
    );
    s["folders"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["id"] == FOLDER))
        .cloned()
        .unwrap_or_else(|| panic!("no folder {FOLDER} in the status of {}: {s}", node.name))
}

/// What a folder status says is still needed: by this device, then by each
/// of its peers (as this device knows them), as `(who, items)`.
fn needs(node: &Node, f: &Value) -> Vec<(String, u64)> {
    let mut out = vec![(
        node.name.clone(),
        f["need_items"].as_u64().unwrap_or(u64::MAX),
    )];
    for p in f["peers"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("?");
        out.push((
            format!("{name} (as {} sees it)", node.name),
            p["need_items"].as_u64().unwrap_or(u64::MAX),
        ));
    }
    out
}

/// A tree as [`agent::tree`] describes it: per relative path, what is there.
type Tree = BTreeMap<String, String>;

/// Whether the file name of `path` contains `.ferry-tmp`: one of ferry's temp
/// files, which are never synced.
fn is_temp(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.contains(".ferry-tmp"))
}

/// Whether the file name of `path` is that of a pull's temp file,
/// `.ferry-tmp-<16 hex>-<16 hex>.part` (the hashes of its path and version).
fn is_pull_temp(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or_default();
    let Some(hashes) = name
        .strip_prefix(".ferry-tmp-")
        .and_then(|n| n.strip_suffix(".part"))
    else {
        return false;
    };
    let hex16 = |h: &str| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit());
    hashes
        .split_once('-')
        .is_some_and(|(p, v)| hex16(p) && hex16(v))
}

/// `tree` split in what sync must reproduce and ferry's temp files.
fn split(tree: Tree) -> (Tree, Tree) {
    tree.into_iter().partition(|(p, _)| !is_temp(p))
}

/// `agent::tree` without temp files, or `None` if the tree changed while it
/// was read (an entry vanished between listing and reading it: a pull was
/// finishing).
fn synced_tree(root: &Path) -> Option<Tree> {
    let t = std::panic::catch_unwind(|| tree(root)).ok();
    if t.is_none() {
        eprintln!(
            "(the tree at {} changed while it was read; reading it again)",
            root.display()
        );
    }
    t.map(|t| split(t).0)
}

/// The entries in which two trees differ, one line each.
fn diff(x: &Tree, y: &Tree) -> Vec<String> {
    let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
    keys.into_iter()
        .filter(|k| x.get(*k) != y.get(*k))
        .map(|k| format!("  {k}: {:?} vs {:?}", x.get(k), y.get(k)))
        .collect()
}

/// Why the devices have not converged: what differs between A's tree and
/// each other's (temp files aside), and what each says it still needs.
fn report(devs: &[Device], seed: u64) -> String {
    let mut out = format!("seed {seed}: the devices did not converge within {PATIENCE:?}\n");
    let trees: Vec<_> = devs.iter().map(|d| synced_tree(&d.root)).collect();
    for (i, d) in devs.iter().enumerate().skip(1) {
        match (&trees[0], &trees[i]) {
            (Some(t0), Some(ti)) => {
                let lines = diff(t0, ti);
                out += &format!(
                    "{} vs {}: {} paths differ\n{}\n",
                    devs[0].node.name,
                    d.node.name,
                    lines.len(),
                    lines.join("\n")
                );
            }
            _ => {
                out += &format!(
                    "{} vs {}: a tree was changing\n",
                    devs[0].node.name, d.node.name
                )
            }
        }
    }
    for d in devs {
        let f = folder_status(&d.node);
        let need = d.node.run(&["status", "--need", FOLDER, "--json"]);
        let temps: Vec<String> = std::panic::catch_unwind(|| tree(&d.root))
            .map(|t| split(t).1.into_keys().collect())
            .unwrap_or_default();
        out += &format!(
            "{}: state {} error {} needs {:?} temp files {temps:?}\n  status --need: {}\n",
            d.node.name,
            f["state"],
            f["error"],
            needs(&d.node, &f),
            need.stdout.trim()
        );
    }
    out
}

/// Waits until the three trees (temp files aside) are the same and no device
/// needs anything, and that holds (with the same tree) for [`SETTLE`];
/// returns the tree. Gives up after [`PATIENCE`], saying what differs.
#[track_caller]
fn wait_converged(devs: &[Device], seed: u64) -> Tree {
    let deadline = Instant::now() + PATIENCE;
    let mut since: Option<(Tree, Instant)> = None;
    loop {
        let settled = devs.iter().all(|d| {
            let f = folder_status(&d.node);
            needs(&d.node, &f).iter().all(|(_, n)| *n == 0)
        });
        let same = settled
            .then(|| {
                devs.iter()
                    .map(|d| synced_tree(&d.root))
                    .collect::<Option<Vec<_>>>()
            })
            .flatten()
            .filter(|t| t[0] == t[1] && t[0] == t[2])
            .map(|mut t| t.swap_remove(0));
        since = match (same, since) {
            (Some(t), Some((before, at))) if t == before => {
                if at.elapsed() >= SETTLE {
                    return t;
                }
                Some((before, at))
            }
            (Some(t), _) => Some((t, Instant::now())),
            (None, _) => None,
        };
        assert!(Instant::now() < deadline, "{}", report(devs, seed));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Three devices sharing [`FOLDER`] in a full mesh, all agents running.
fn mesh(lab: &Lab) -> Vec<Device> {
    let a = lab.node("a");
    let b = lab.node("b");
    let c = lab.node("c");
    let a_docs = a.add_folder(FOLDER);
    let (b_docs, c_docs) = (b.path(FOLDER), c.path(FOLDER));
    // Local versions kept, and all of them (module doc: no version lost).
    for n in [&a, &b, &c] {
        n.edit_config("\nlocal = false\n", "\nlocal = true\n");
        n.edit_config("retention = \"staggered\"", "retention = \"keep-all\"");
        // The random deletes are meant: a device that was stopped while many
        // happened must not hold them back as a mass delete (the long run
        // stalled on that, waiting for `ferry folder confirm-deletes`).
        n.edit_config("hold_deletes_percent = 50", "hold_deletes_percent = 100");
    }
    let agents = [Agent::start(&a), Agent::start(&b), Agent::start(&c)];
    pair(
        &a,
        &b,
        &["--folder", FOLDER],
        &["--into", b_docs.to_str().expect("UTF-8 temp path")],
    );
    pair(
        &a,
        &c,
        &["--folder", FOLDER],
        &["--into", c_docs.to_str().expect("UTF-8 temp path")],
    );
    pair(&b, &c, &[], &[]);
    b.run(&["share", FOLDER, &c.id()]).ok();
    c.run(&["share", FOLDER, &b.id()]).ok();
    let nodes = [(a, a_docs), (b, b_docs), (c, c_docs)];
    for (n, root) in &nodes {
        wait_until(
            &format!("{} shares {FOLDER} with both others", n.name),
            || {
                root.join(".ferry").is_dir()
                    && folder_status(n)["peers"]
                        .as_array()
                        .is_some_and(|p| p.len() == 2)
            },
        );
    }
    nodes
        .into_iter()
        .zip(agents)
        .map(|((node, root), agent)| Device {
            node,
            root,
            agent: Some(agent),
            back_at: 0,
            asleep_until: None,
        })
        .collect()
}

/// Tallies of a run, printed at the end.
#[derive(Default)]
struct Tally {
    done: u64,
    skipped: u64,
    stops: u64,
    sleeps: u64,
    two_device_edits: u64,
}

/// Does operation `i`: `op` on device `who` (see [`Op`]).
fn step(
    devs: &mut [Device],
    model: &mut Model,
    tally: &mut Tally,
    rng: &mut Rng,
    i: u64,
    who: usize,
    op: Op,
) -> Result<String, String> {
    let awake = devs.iter().filter(|d| d.awake()).count();
    match op {
        Op::StopAgent => {
            if !devs[who].awake() {
                return Err("stop: the agent is stopped or asleep".to_owned());
            }
            if awake < 2 {
                return Err("stop: the only agent awake".to_owned());
            }
            devs[who].agent.take().expect("awake").stop();
            devs[who].back_at = i + rng.between(1, 7);
            tally.stops += 1;
            Ok(format!("agent stopped until op {}", devs[who].back_at))
        }
        Op::Sleep => {
            if !devs[who].awake() {
                return Err("sleep: the agent is stopped or asleep".to_owned());
            }
            if awake < 2 {
                return Err("sleep: the only agent awake".to_owned());
            }
            let ms = rng.between(500, 5_000);
            devs[who].agent.as_ref().expect("awake").pause();
            devs[who].asleep_until = Some(Instant::now() + Duration::from_millis(ms));
            tally.sleeps += 1;
            Ok(format!("agent frozen (SIGSTOP) for {ms} ms"))
        }
        Op::EditOnTwo => {
            let mut other = (who + 1 + rng.below(2) as usize) % 3;
            if devs[other].asleep_until.is_some() {
                other = 3 - who - other;
            }
            if devs[other].asleep_until.is_some() {
                return Err("write on two: the others are asleep".to_owned());
            }
            let (files, _) = listing(&devs[who].root);
            let rel = match rng.pick(&files) {
                Some(f) if rng.percent(70) => f.clone(),
                _ => file_name(rng),
            };
            let parent = rel.rsplit_once('/').map_or("", |(d, _)| d);
            if !devs[other].root.join(parent).is_dir() {
                return Err(format!(
                    "write {rel} on two: {} has no {parent}",
                    devs[other].node.name
                ));
            }
            let (x, y) = (content(rng), content(rng));
            model.settle(&devs[who], who, &rel);
            model.settle(&devs[other], other, &rel);
            // Back to back: both devices change the path before either
            // hears of the other's change.
            let wx = write_over(&devs[who].root.join(&rel), &x);
            let wy = write_over(&devs[other].root.join(&rel), &y);
            let what = format!(
                "write {rel} here ({} bytes) and on {} ({} bytes) at once",
                x.len(),
                devs[other].node.name,
                y.len()
            );
            if let Err(e) = &wx {
                return Err(format!("{what}: here failed: {e}"));
            }
            model.wrote(who, rel.clone(), &x, i);
            if let Err(e) = &wy {
                return Err(format!("{what}: on {} failed: {e}", devs[other].node.name));
            }
            model.wrote(other, rel, &y, i);
            tally.two_device_edits += 1;
            Ok(what)
        }
        _ => {
            let dev = &devs[who];
            let applied = apply(op, &dev.root, rng, &mut |p| model.settle(dev, who, p))?;
            for (path, bytes) in applied.wrote {
                model.wrote(who, path, &bytes, i);
            }
            Ok(applied.what)
        }
    }
}

/// Wakes the frozen agents whose time has come (all of them with `all`),
/// and starts the stopped ones due back by operation `i` (all with `all`).
fn wake(devs: &mut [Device], journal: &mut Journal, i: u64, all: bool) {
    let now = Instant::now();
    for d in devs.iter_mut() {
        if d.asleep_until.is_some_and(|t| all || t <= now) {
            d.agent.as_ref().expect("a frozen agent").resume();
            d.asleep_until = None;
            journal.note(format!("{i:5} {}: agent woken (SIGCONT)", d.node.name));
        }
        if d.agent.is_none() && (all || d.back_at <= i) {
            d.agent = Some(Agent::start(&d.node));
            journal.note(format!("{i:5} {}: agent started again", d.node.name));
        }
    }
}

/// Checks that every content ferry must keep (module doc) is a file on some
/// device or a version in some device's history; `trees` are the devices'
/// final trees.
fn check_no_version_lost(devs: &[Device], trees: &[Tree], model: &Model, seed: u64) {
    let mut found: BTreeSet<String> = BTreeSet::new();
    for t in trees {
        for desc in t.values().filter(|d| d.starts_with("file ")) {
            found.insert(desc.rsplit(' ').next().expect("a hash").to_owned());
        }
    }
    for d in devs {
        let h = d
            .node
            .run(&["history", &format!("{FOLDER}:"), "--json"])
            .ok()
            .json();
        for v in h["versions"].as_array().into_iter().flatten() {
            if let Some(hash) = v["hash"].as_str() {
                found.insert(hash.to_owned());
            }
        }
    }
    let lost: Vec<String> = model
        .contents
        .iter()
        .filter(|c| c.fate == Fate::Kept && !found.contains(&c.hash))
        .map(|c| {
            format!(
                "  op {} on {}: {} ({} bytes, blake3 {})",
                c.op, devs[c.device].node.name, c.path, c.len, c.hash
            )
        })
        .collect();
    assert!(
        lost.is_empty(),
        "seed {seed}: {} of {} contents ferry had to keep are neither a file nor a \
         version in any device's history:\n{}",
        lost.len(),
        model.count(Fate::Kept),
        lost.join("\n")
    );
}

/// The scenario: `ops` random operations (see the module doc), then
/// convergence and its invariants.
fn converge(default_ops: u64) {
    let seed = env_number("FERRY_CONVERGENCE_SEED", DEFAULT_SEED);
    let ops = env_number("FERRY_CONVERGENCE_OPS", default_ops);
    eprintln!(
        "convergence: seed {seed}, {ops} ops (FERRY_CONVERGENCE_SEED={seed} FERRY_CONVERGENCE_OPS={ops})"
    );
    let mut journal = Journal {
        seed,
        ops,
        lines: Vec::new(),
    };
    let lab = Lab::new();
    let mut devs = mesh(&lab);
    let mut rng = Rng(seed);
    let mut model = Model::default();
    let mut tally = Tally::default();
    let started = Instant::now();

    for i in 0..ops {
        wake(&mut devs, &mut journal, i, false);
        // What the indexes recorded since the last look.
        for (n, d) in devs.iter().enumerate() {
            if d.awake() && model.pending.keys().any(|(dn, _)| *dn == n) {
                model.observe(n, &d.root, &index_entries(&d.node, None));
            }
        }
        let mut who = rng.below(3) as usize;
        let op = draw_op(&mut rng);
        // Nobody edits on a laptop whose lid is closed: a folder operation
        // drawn for a frozen device goes to the next one not frozen (one is:
        // an agent is frozen only while another is awake).
        if !matches!(op, Op::StopAgent | Op::Sleep) {
            while devs[who].asleep_until.is_some() {
                who = (who + 1) % 3;
            }
        }
        let name = devs[who].node.name.clone();
        match step(&mut devs, &mut model, &mut tally, &mut rng, i, who, op) {
            Ok(what) => {
                tally.done += 1;
                journal.note(format!("{i:5} {name}: {what}"));
            }
            Err(why) => {
                tally.skipped += 1;
                journal.note(format!("{i:5} {name}: skipped: {why}"));
            }
        }
        if rng.percent(30) {
            let ms = rng.below(301);
            journal.note(format!("{i:5} sleep {ms} ms"));
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    wake(&mut devs, &mut journal, ops, true);
    let ops_took = started.elapsed();
    eprintln!(
        "convergence: {} ops done, {} skipped, {} agent stops, {} sleeps, {} two-device edits in {ops_took:.1?}; waiting for convergence",
        tally.done, tally.skipped, tally.stops, tally.sleeps, tally.two_device_edits
    );
    let converged = wait_converged(&devs, seed);
    for ((n, path), _) in model.pending.clone() {
        model.settle(&devs[n], n, &path);
    }
    model.excuse();

    // The invariants, on a fresh look at every device.
    let (trees, temps): (Vec<Tree>, Vec<Tree>) = devs.iter().map(|d| split(tree(&d.root))).unzip();
    for (d, t) in devs.iter().zip(&trees).skip(1) {
        assert!(
            *t == trees[0],
            "seed {seed}: {} and {} differ after converging:\n{}",
            devs[0].node.name,
            d.node.name,
            diff(&trees[0], t).join("\n")
        );
    }
    assert_eq!(
        trees[0], converged,
        "seed {seed}: the tree changed after it settled"
    );
    let mut left = Vec::new();
    for (d, t) in devs.iter().zip(&temps) {
        for (path, desc) in t {
            assert!(
                is_pull_temp(path) && desc.starts_with("file "),
                "seed {seed}: {}: {path} is not a temp file of a pull: {desc}",
                d.node.name
            );
            left.push(format!("  {}: {path}: {desc}", d.node.name));
        }
    }
    if !left.is_empty() {
        let msg = format!(
            "seed {seed}: {} temp files left by abandoned pulls:\n{}",
            left.len(),
            left.join("\n")
        );
        panic!("{msg}");
    }
    let written: BTreeSet<&str> = model.contents.iter().map(|c| c.hash.as_str()).collect();
    let copies: Vec<&String> = trees[0]
        .keys()
        .filter(|p| p.contains(".sync-conflict-"))
        .collect();
    for copy in &copies {
        let desc = &trees[0][*copy];
        assert!(
            desc.starts_with("file "),
            "seed {seed}: conflict copy {copy} is not a plain file: {desc}"
        );
        let hash = desc.rsplit(' ').next().expect("a hash");
        assert!(
            written.contains(hash),
            "seed {seed}: conflict copy {copy} holds a content the run never wrote: {desc}"
        );
    }
    for d in &devs {
        let f = folder_status(&d.node);
        for (who, n) in needs(&d.node, &f) {
            assert_eq!(n, 0, "seed {seed}: {who} still needs {n} items: {f}");
        }
        let v = d.node.run(&["history", "verify", "--json"]);
        assert_eq!(
            v.code, 0,
            "seed {seed}: {}: history damaged: {v}",
            d.node.name
        );
    }
    check_no_version_lost(&devs, &trees, &model, seed);

    let conflicts: BTreeSet<String> = devs
        .iter()
        .flat_map(|d| {
            let run = d.node.run(&["conflicts", "--json"]).ok();
            run.json()
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["conflict_path"].as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect();
    let files = trees[0].values().filter(|v| v.starts_with("file ")).count();
    eprintln!(
        "convergence: seed {seed} converged after {:.1?} (ops {ops_took:.1?}): {files} files ({} conflict copies, {} conflicts recorded), {} directories; \
         {} contents written: {} checked kept, {} replaced while their agent was down, {} gone before they were seen recorded",
        started.elapsed(),
        copies.len(),
        conflicts.len(),
        trees[0].values().filter(|v| v.starts_with("dir ")).count(),
        model.contents.len(),
        model.count(Fate::Kept),
        model.count(Fate::ReplacedWhileDown),
        model.count(Fate::Unseen),
    );
}

/// The default run: about 150 random operations, a few agent restarts and
/// sleeps.
#[test]
fn three_devices_converge_after_random_edits_and_restarts() {
    converge(DEFAULT_OPS);
}

/// The long run: 10,000 random operations (module doc).
#[test]
#[ignore = "long run: FERRY_CONVERGENCE_OPS=10000 cargo test --release --test convergence -- --ignored"]
fn convergence_long_run() {
    converge(LONG_RUN_OPS);
}
