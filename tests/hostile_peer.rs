//! A misbehaving paired device: Mallory pairs with Alice through real agents,
//! then her agent stops and the test speaks the sync protocol with her key by
//! hand, announcing unsafe paths and serving corrupt chunks. Alice must refuse
//! the records, close the link, count what the peer did wrong, and never write
//! anything that did not verify.

#[path = "common/agent.rs"]
mod agent;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry::chunking::{DEFAULT_PARAMS, FileDigest, chunk_bytes, group_ranges, groups};
use ferry::config::NetworkConfig;
use ferry::device::DeviceId;
use ferry::home::Home;
use ferry::protocol::{
    FolderOffer, IndexMessage, MAX_FRAME, PROTOCOL_VERSION, Reply, Request, SYNC_ALPN, SyncMessage,
    WireChunk, WireFile, WireGroup, WireVersion, read_msg, write_msg,
};
use ferry::sync::link::CLOSE_PROTOCOL;
use ferry::transport::{self, AllowList};
use iroh::Endpoint;
use iroh::endpoint::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use serde_json::Value;

use agent::{Agent, Lab, Node, PATIENCE, pair, pseudo_random, wait_for, wait_until};

/// What Alice's folder holds before Mallory misbehaves.
const HELLO: &[u8] = b"hello from alice\n";
/// The byte a corrupt chunk is made of (long runs of it never occur in the
/// pseudo-random payloads, so finding one on Alice's disk means it was written).
const BAD: u8 = 0xa5;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i64
}

/// Alice shares `docs` (holding `hello.txt`) with Mallory; Mallory's agent has
/// synced it and is stopped again, so Alice still accepts Mallory's key but no
/// honest agent answers for it. Returns Alice, Mallory, Alice's agent and
/// Alice's folder.
fn alice_and_mallory(lab: &Lab) -> (Node, Node, Agent, PathBuf) {
    alice_and_mallory_with(lab, |_| {})
}

/// [`alice_and_mallory`], with `setup` run on Alice's fresh home (config
/// edits, a filesystem for her folder) before her folder is added.
fn alice_and_mallory_with(lab: &Lab, setup: impl FnOnce(&Node)) -> (Node, Node, Agent, PathBuf) {
    alice_and_mallory_sharing(lab, setup, "hello.txt", HELLO)
}

/// [`alice_and_mallory_with`], with `name` holding `data` in Alice's folder.
fn alice_and_mallory_sharing(
    lab: &Lab,
    setup: impl FnOnce(&Node),
    name: &str,
    data: &[u8],
) -> (Node, Node, Agent, PathBuf) {
    let a = lab.node("alice");
    let m = lab.node("mallory");
    setup(&a);
    let docs = a.add_folder("docs");
    fs::write(docs.join(name), data).unwrap();
    let agent_a = Agent::start(&a);
    let agent_m = Agent::start(&m);
    let m_docs = m.path("docs");
    pair(
        &a,
        &m,
        &["--folder", "docs"],
        &["--into", m_docs.to_str().unwrap()],
    );
    wait_until(&format!("mallory's agent has {name}"), || {
        fs::read(m_docs.join(name)).is_ok_and(|b| b == data)
    });
    agent_m.stop();
    let m_id = m.id();
    wait_until("alice sees mallory's agent gone", || !a.connected_to(&m_id));
    (a, m, agent_a, docs)
}

/// One of the per-peer counters of `devices --json` on `a` for device `id`.
fn counter(a: &Node, id: &str, key: &str) -> u64 {
    let d: Value = a.device(id).expect("alice lists mallory");
    d[key].as_u64().unwrap_or_else(|| panic!("no {key} in {d}"))
}

/// The names in a directory.
fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// Every regular file under `dir`, `.ferry` included.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

/// Whether some file under `dir` holds a 4 KiB run of [`BAD`] bytes.
fn corrupt_bytes_on_disk(dir: &Path) -> Option<PathBuf> {
    let run = [BAD; 4096];
    let mut files = Vec::new();
    files_under(dir, &mut files);
    files
        .into_iter()
        .find(|f| fs::read(f).is_ok_and(|bytes| bytes.windows(run.len()).any(|w| w == run)))
}

/// One file's content, as Mallory announces and serves it.
#[derive(Clone)]
struct Content {
    data: Arc<Vec<u8>>,
    digest: Arc<FileDigest>,
}

impl Content {
    fn new(data: Vec<u8>) -> Self {
        let digest = chunk_bytes(&data, DEFAULT_PARAMS);
        Self {
            data: Arc::new(data),
            digest: Arc::new(digest),
        }
    }

    /// A well-formed record of this content at `path`, made by `by`.
    fn record(&self, path: &str, by: DeviceId, sequence: u64) -> WireFile {
        let me = by.short().0;
        WireFile {
            path: path.to_owned(),
            kind: 0,
            size: self.digest.size,
            mtime_ns: now_ns(),
            permissions: 0o644,
            hash: Some(self.digest.hash.0),
            symlink_target: None,
            deleted: false,
            version: vec![(me, 1)],
            modified_by: me,
            sequence,
            groups: groups(&self.digest.chunks)
                .into_iter()
                .map(|g| WireGroup {
                    hash: g.hash,
                    chunks: g.chunks,
                    size: g.size,
                })
                .collect(),
        }
    }
}

/// Mallory's endpoint, with her real key.
struct Mallory {
    ep: Endpoint,
    me: DeviceId,
    alice: DeviceId,
    alice_addr: SocketAddr,
}

/// A link to Alice after the hello exchange.
struct Link {
    conn: Connection,
    /// The control stream: kept open, since Alice ends the link's sync when
    /// it ends.
    _control: SendStream,
    /// Mallory's index uni-stream.
    index: SendStream,
    /// Mallory's index epoch and sequence as Alice holds them.
    epoch: u64,
    sequence: u64,
}

impl Mallory {
    /// Binds an endpoint with Mallory's key (her agent must be stopped).
    fn new(rt: &tokio::runtime::Runtime, m: &Node, a: &Node) -> Self {
        let home = Home::open(&m.home).expect("open mallory's home");
        let alice: DeviceId = a.id().parse().expect("alice's id");
        let alice_addr = SocketAddr::from(([127, 0, 0, 1], a.port()));
        let mut net = NetworkConfig::default().offline();
        net.local_discovery = false;
        let allow = AllowList::default();
        allow.insert(alice);
        let ep = rt
            .block_on(transport::bind(
                home.secret_key().clone(),
                &net,
                "127.0.0.1:0".parse().unwrap(),
                allow,
            ))
            .expect("bind mallory's endpoint");
        Self {
            ep,
            me: home.device_id(),
            alice,
            alice_addr,
        }
    }

    /// Dials Alice and exchanges hellos offering `docs`; drains what Alice
    /// sends on her control and index streams in the background.
    async fn link(&self) -> Link {
        let conn = transport::dial(&self.ep, self.alice, &[self.alice_addr], SYNC_ALPN)
            .await
            .expect("dial alice");
        let (mut send, mut recv) = conn.open_bi().await.expect("open the control stream");
        let hello = SyncMessage::Hello {
            version: PROTOCOL_VERSION,
            name: "mallory".into(),
            folders: vec![FolderOffer {
                id: "docs".into(),
                label: "docs".into(),
                encrypted: false,
                secret: None,
            }],
            index: vec![],
        };
        write_msg(&mut send, &hello).await.expect("send hello");
        let theirs = tokio::time::timeout(PATIENCE, read_msg::<SyncMessage>(&mut recv))
            .await
            .expect("alice answers the hello in time")
            .expect("alice's hello reads");
        let Some(SyncMessage::Hello { folders, index, .. }) = theirs else {
            panic!("expected alice's hello, got {theirs:?}");
        };
        assert!(
            folders.iter().any(|f| f.id == "docs"),
            "alice does not offer docs: {folders:?}"
        );
        let (epoch, sequence) = index
            .iter()
            .find(|s| s.folder == "docs")
            .map_or((0, 0), |s| (s.epoch, s.sequence));
        let epoch = if epoch == 0 { 1 } else { epoch };
        tokio::spawn(drain_control(recv));
        let c = conn.clone();
        tokio::spawn(async move {
            // If this stream stalled or ended, Alice would stop her side of the
            // link's sync, so read it to the end.
            if let Ok(mut r) = c.accept_uni().await {
                while let Ok(Some(_)) = read_msg::<IndexMessage>(&mut r).await {}
            }
        });
        let index = conn.open_uni().await.expect("open the index stream");
        Link {
            conn,
            _control: send,
            index,
            epoch,
            sequence,
        }
    }
}

async fn drain_control(mut recv: RecvStream) {
    while let Ok(Some(_)) = read_msg::<SyncMessage>(&mut recv).await {}
}

impl Link {
    /// The sequence number of Mallory's next record.
    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }

    /// Sends one index update for `docs` (an empty one just makes Alice look
    /// at the folder again).
    async fn announce(&mut self, files: Vec<WireFile>) {
        let msg = IndexMessage::Update {
            folder: "docs".into(),
            epoch: self.epoch,
            sequence: self.sequence,
            files,
        };
        write_msg(&mut self.index, &msg)
            .await
            .expect("send an index update");
    }
}

/// Mallory takes every request on `conn` and never answers it; she keeps the
/// streams. Counts the requests taken, and those Alice let go of since.
fn never_answer(
    rt: &tokio::runtime::Runtime,
    conn: &Connection,
) -> (Arc<AtomicU64>, Arc<AtomicU64>) {
    let asked = Arc::new(AtomicU64::new(0));
    let let_go = Arc::new(AtomicU64::new(0));
    let conn = conn.clone();
    let (a, l) = (asked.clone(), let_go.clone());
    rt.spawn(async move {
        while let Ok((send, mut recv)) = conn.accept_bi().await {
            let (asked, let_go) = (a.clone(), l.clone());
            tokio::spawn(async move {
                if let Ok(Some(_)) = read_msg::<Request>(&mut recv).await {
                    asked.fetch_add(1, Ordering::Relaxed);
                    // Resolves when Alice drops her end of the request.
                    let _ = send.stopped().await;
                    let_go.fetch_add(1, Ordering::Relaxed);
                }
                drop(recv);
            });
        }
    });
    (asked, let_go)
}

/// A pull that waits on a peer (here one that never answers) does not stop
/// the folder's scans: a local edit meanwhile is recorded (and so sent, and
/// kept in the history) long before the pull gives up on that peer.
#[test]
fn a_local_edit_is_recorded_while_a_pull_waits_on_a_stalled_peer() {
    let lab = Lab::new();
    // Alice keeps the default request timeout (60 s), longer than the
    // patience of the waits below.
    let (a, m, _agent_a, docs) = alice_and_mallory(&lab);
    let rt = runtime();
    let mallory = Mallory::new(&rt, &m, &a);
    let mut link = rt.block_on(mallory.link());
    let (asked, let_go) = never_answer(&rt, &link.conn);
    let wanted = Content::new(pseudo_random(10_000, 0x10ca1));
    let record = wanted.record("wanted.bin", mallory.me, link.next_sequence());
    rt.block_on(link.announce(vec![record]));
    wait_until("alice asks mallory for wanted.bin", || {
        asked.load(Ordering::Relaxed) >= 1
    });

    let body = b"written while alice waits on mallory\n";
    fs::write(docs.join("mine.txt"), body).unwrap();
    let hash = blake3::hash(body).to_hex().to_string();
    wait_until("alice records mine.txt while her pull waits", || {
        let run = a.run(&["ls", "docs", "mine.txt", "--json"]).ok();
        run.json()
            .as_array()
            .is_some_and(|l| l.iter().any(|e| e["hash"] == hash.as_str()))
    });
    assert_eq!(
        let_go.load(Ordering::Relaxed),
        0,
        "alice gave up on mallory before she recorded mine.txt"
    );
    let status = a.status();
    let docs_state = status["folders"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["id"] == "docs"))
        .map(|f| f["state"].clone());
    assert_eq!(
        docs_state,
        Some(Value::from("syncing")),
        "the pull still runs: {status}"
    );
    assert!(!docs.join("wanted.bin").exists());
    drop(link);
    rt.block_on(mallory.ep.close());
}

/// Answers Alice's requests on `conn` from `content`: group lists always
/// correctly, chunk bytes correctly only while `honest` holds (otherwise
/// `size` bytes of [`BAD`]).
async fn serve(conn: Connection, content: Content, honest: Arc<AtomicBool>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(answer(send, recv, content.clone(), honest.clone()));
    }
}

async fn answer(send: SendStream, mut recv: RecvStream, content: Content, honest: Arc<AtomicBool>) {
    let Ok(Some(req)) = read_msg::<Request>(&mut recv).await else {
        return;
    };
    answer_request(send, req, content, honest).await;
}

/// Answers Alice's requests on `conn` honestly from whichever of `contents`
/// the request is about.
async fn serve_each(conn: Connection, contents: Vec<Content>) {
    while let Ok((send, mut recv)) = conn.accept_bi().await {
        let contents = contents.clone();
        tokio::spawn(async move {
            let Ok(Some(req)) = read_msg::<Request>(&mut recv).await else {
                return;
            };
            let about = |c: &&Content| match &req {
                Request::Chunk { hash, size, .. } => c
                    .digest
                    .chunks
                    .iter()
                    .any(|k| k.hash.0 == *hash && k.len == *size),
                Request::Groups { file_hash, .. } => c.digest.hash.0 == *file_hash,
                _ => false,
            };
            let content = contents.iter().find(about).unwrap_or(&contents[0]).clone();
            answer_request(send, req, content, Arc::new(AtomicBool::new(true))).await;
        });
    }
}

async fn answer_request(
    mut send: SendStream,
    req: Request,
    content: Content,
    honest: Arc<AtomicBool>,
) {
    let chunks = &content.digest.chunks;
    let unavailable = Reply::Unavailable {
        reason: "not here".into(),
    };
    match req {
        Request::Chunk { size, hash, .. } => {
            match chunks.iter().find(|c| c.hash.0 == hash && c.len == size) {
                Some(c) => {
                    let bytes = if honest.load(Ordering::SeqCst) {
                        let start = c.offset as usize;
                        content.data[start..start + c.len as usize].to_vec()
                    } else {
                        vec![BAD; size as usize]
                    };
                    if write_msg(&mut send, &Reply::Chunk { size }).await.is_err() {
                        return;
                    }
                    let _ = send.write_all(&bytes).await;
                }
                None => {
                    let _ = write_msg(&mut send, &unavailable).await;
                }
            }
        }
        Request::Groups {
            file_hash,
            groups: wanted,
            ..
        } => {
            let ranges = group_ranges(chunks);
            let found: Option<Vec<Vec<WireChunk>>> = (file_hash == content.digest.hash.0)
                .then(|| {
                    wanted
                        .iter()
                        .map(|g| {
                            ranges.get(*g as usize).map(|r| {
                                chunks[r.clone()]
                                    .iter()
                                    .map(|c| WireChunk {
                                        hash: c.hash.0,
                                        size: c.len,
                                    })
                                    .collect()
                            })
                        })
                        .collect()
                })
                .flatten();
            let reply = match found {
                Some(groups) => Reply::Groups { groups },
                None => unavailable,
            };
            let _ = write_msg(&mut send, &reply).await;
        }
        // One version of `content` "kept" at whatever path is asked, id 1.
        Request::History { path, .. } => {
            let version = WireVersion {
                id: 1,
                path: if path.is_empty() {
                    "evil.bin".into()
                } else {
                    path
                },
                kind: 0,
                size: content.digest.size,
                mtime_ns: now_ns(),
                permissions: 0o644,
                hash: Some(content.digest.hash.0),
                symlink_target: None,
                modified_by: 1,
                device: None,
                superseded_at: 1,
                reason: "replaced".into(),
            };
            let reply = Reply::History {
                versions: vec![version],
                truncated: false,
            };
            let _ = write_msg(&mut send, &reply).await;
        }
        Request::VersionChunks { id: 1, start, .. } => {
            let reply = Reply::Chunks {
                chunks: chunks
                    .iter()
                    .skip(start as usize)
                    .map(|c| WireChunk {
                        hash: c.hash.0,
                        size: c.len,
                    })
                    .collect(),
                more: false,
            };
            let _ = write_msg(&mut send, &reply).await;
        }
        // The bad peer holds no vaults.
        _ => {
            let _ = write_msg(&mut send, &unavailable).await;
        }
    }
    let _ = send.finish();
}

#[test]
fn an_unsafe_path_from_a_peer_is_refused_and_nothing_is_written() {
    let lab = Lab::new();
    let (a, m, _agent_a, docs) = alice_and_mallory(&lab);
    let m_id = m.id();
    let rt = runtime();
    let mallory = Mallory::new(&rt, &m, &a);
    let outside = a.dir.clone();
    assert_eq!(docs.parent(), Some(outside.as_path()));
    let before_outside = names(&outside);
    let payload = Content::new(b"written by mallory\n".to_vec());
    // Mallory serves the content honestly: a record that got through would be
    // pulled and written where its path says.
    let honest = Arc::new(AtomicBool::new(true));

    let absolute = outside.join("escaped-abs.txt");
    let cases = [
        ("../escaped.txt".to_owned(), outside.join("escaped.txt")),
        (absolute.to_str().unwrap().to_owned(), absolute.clone()),
        (
            "sub/../../escaped-mid.txt".to_owned(),
            outside.join("escaped-mid.txt"),
        ),
    ];
    for (n, (path, target)) in cases.iter().enumerate() {
        let mut link = rt.block_on(mallory.link());
        rt.spawn(serve(link.conn.clone(), payload.clone(), honest.clone()));
        let seq = link.next_sequence();
        let record = payload.record(path, mallory.me, seq);
        rt.block_on(link.announce(vec![record]));
        let closed = wait_for(&format!("alice closes the link over {path:?}"), || {
            assert!(
                !target.exists(),
                "alice wrote {} for the record {path:?}",
                target.display()
            );
            link.conn.close_reason()
        });
        match closed {
            ConnectionError::ApplicationClosed(close) => {
                assert_eq!(
                    close.error_code,
                    VarInt::from_u32(CLOSE_PROTOCOL),
                    "{path:?}: {close:?}"
                );
                let reason = String::from_utf8_lossy(&close.reason);
                assert!(reason.contains("unsafe path"), "{path:?}: {reason}");
            }
            other => panic!("{path:?}: expected a close with code {CLOSE_PROTOCOL}, got {other}"),
        }
        // The count goes up before the link is closed.
        assert_eq!(
            counter(&a, &m_id, "bad_records"),
            n as u64 + 1,
            "after {path:?}"
        );
        assert!(!target.exists(), "{}", target.display());
    }

    // Nothing escaped, nothing was created inside, the old file is intact.
    assert_eq!(names(&outside), before_outside);
    assert_eq!(names(&docs), [".ferry", "hello.txt"]);
    assert_eq!(fs::read(docs.join("hello.txt")).unwrap(), HELLO);
    let lab_root = outside.parent().unwrap();
    assert!(
        names(lab_root).iter().all(|n| !n.contains("escaped")),
        "{:?}",
        names(lab_root)
    );

    // The same record with a safe path is taken: the refusals above were about
    // the paths, not the setup.
    let mut link = rt.block_on(mallory.link());
    rt.spawn(serve(link.conn.clone(), payload.clone(), honest.clone()));
    let seq = link.next_sequence();
    rt.block_on(link.announce(vec![payload.record("inside.txt", mallory.me, seq)]));
    wait_until("alice pulls inside.txt from mallory", || {
        fs::read(docs.join("inside.txt")).is_ok_and(|b| b == *payload.data)
    });
    assert!(link.conn.close_reason().is_none());
    assert_eq!(counter(&a, &m_id, "bad_records"), 3);
    assert_eq!(names(&docs), [".ferry", "hello.txt", "inside.txt"]);
    assert_eq!(names(&outside), before_outside);
    rt.block_on(mallory.ep.close());
}

#[test]
fn a_file_under_a_symlink_from_a_peer_is_never_written_through_it() {
    let lab = Lab::new();
    let (a, m, _agent_a, docs) = alice_and_mallory(&lab);
    let rt = runtime();
    let mallory = Mallory::new(&rt, &m, &a);
    let outside = a.dir.join("outside");
    fs::create_dir_all(&outside).unwrap();
    let payload = Content::new(b"written by mallory through a link\n".to_vec());
    let honest = Arc::new(AtomicBool::new(true));
    let mut link = rt.block_on(mallory.link());
    rt.spawn(serve(link.conn.clone(), payload.clone(), honest));

    // A symlink pointing out of the folder, then a file "inside" it, in one
    // update and in that order.
    let mut symlink = payload.record("door", mallory.me, link.next_sequence());
    symlink.kind = 2;
    symlink.size = 0;
    symlink.hash = None;
    symlink.groups = Vec::new();
    symlink.symlink_target = Some(outside.to_str().unwrap().to_owned());
    let through = payload.record("door/evil.txt", mallory.me, link.next_sequence());
    let later = payload.record("later.txt", mallory.me, link.next_sequence());
    rt.block_on(link.announce(vec![symlink, through, later]));

    // Whichever lands first, nothing goes through the link: if the link is
    // there, the file under it is refused as unsafe; if the file came first,
    // `door` is a real directory of the folder (made for it, then kept as a
    // local directory) and the file is in it.
    wait_until("alice pulls the rest", || docs.join("later.txt").exists());
    let refused = |a: &Node| {
        let need = a.run(&["status", "--need", "docs", "--json"]).ok().json();
        need["need"].as_array().and_then(|items| {
            items
                .iter()
                .find(|i| i["path"] == "door/evil.txt")
                .and_then(|i| i["reason"].as_str().map(str::to_owned))
        })
    };
    let outcome = wait_for("alice settles on door", || {
        let door = fs::symlink_metadata(docs.join("door")).ok()?;
        if door.file_type().is_symlink() {
            refused(&a).map(Some)
        } else if door.is_dir() && docs.join("door/evil.txt").exists() {
            Some(None)
        } else {
            None
        }
    });
    assert!(
        fs::read_dir(&outside).unwrap().next().is_none(),
        "something was written through the link: {:?}",
        names(&outside)
    );
    match outcome {
        Some(reason) => assert!(reason.contains("unsafe"), "{reason}"),
        None => assert_eq!(fs::read(docs.join("door/evil.txt")).unwrap(), *payload.data),
    }
    assert_eq!(fs::read(docs.join("hello.txt")).unwrap(), HELLO);
    rt.block_on(mallory.ep.close());
}

#[test]
fn a_corrupt_chunk_is_discarded_counted_and_never_written() {
    let evil = Content::new(pseudo_random(300 * 1024, 0x5eed));
    let chunks = evil.digest.chunks.len();
    assert!(chunks >= 2, "{chunks} chunks");
    corrupt_chunks_are_refused(evil);
}

#[test]
fn a_corrupt_file_of_one_chunk_is_discarded_counted_and_never_written() {
    // Most small files: fetched into memory and written in one step.
    let evil = Content::new(pseudo_random(20 * 1024, 0x5eed));
    assert_eq!(evil.digest.chunks.len(), 1);
    corrupt_chunks_are_refused(evil);
}

/// Mallory announces `evil` and serves it corrupt: Alice counts every bad
/// chunk, writes none of it, says why the file is not in sync, and keeps the
/// link; once Mallory serves the right bytes, exactly those land.
fn corrupt_chunks_are_refused(evil: Content) {
    let lab = Lab::new();
    let (a, m, _agent_a, docs) = alice_and_mallory(&lab);
    let m_id = m.id();
    let rt = runtime();
    let mallory = Mallory::new(&rt, &m, &a);
    let chunks = evil.digest.chunks.len() as u64;
    let target = docs.join("evil.bin");

    let honest = Arc::new(AtomicBool::new(false));
    let mut link = rt.block_on(mallory.link());
    rt.spawn(serve(link.conn.clone(), evil.clone(), honest.clone()));
    let seq = link.next_sequence();
    rt.block_on(link.announce(vec![evil.record("evil.bin", mallory.me, seq)]));

    let bad = |a: &Node| counter(a, &m_id, "bad_chunks");
    wait_until("alice counts a corrupt chunk from mallory", || {
        assert!(!target.exists(), "alice wrote evil.bin from corrupt chunks");
        bad(&a) >= 1
    });
    // Each pass asks twice for every chunk; wait for a retry pass too.
    wait_until("alice tries again and counts more corrupt chunks", || {
        assert!(!target.exists(), "alice wrote evil.bin from corrupt chunks");
        bad(&a) > 2 * chunks
    });
    assert!(!target.exists());
    assert_eq!(counter(&a, &m_id, "chunk_bytes_in"), 0);
    if let Some(f) = corrupt_bytes_on_disk(&docs) {
        panic!("corrupt chunk bytes were written to {}", f.display());
    }
    let need = wait_for("alice says why evil.bin is not in sync", || {
        let need = a.run(&["status", "--need", "docs", "--json"]).ok().json();
        let item = need["need"]
            .as_array()?
            .iter()
            .find(|i| i["path"] == "evil.bin")?
            .clone();
        item["reason"]
            .as_str()
            .is_some_and(|r| r.contains("corrupt"))
            .then_some(item)
    });
    assert_eq!(need["size"], evil.data.len() as u64, "{need}");
    assert_eq!(fs::read(docs.join("hello.txt")).unwrap(), HELLO);
    assert!(
        link.conn.close_reason().is_none(),
        "alice closed the link over corrupt chunks"
    );

    // Once Mallory serves the right bytes, the next try (woken by a fresh
    // index update rather than the backoff) puts exactly that content in place.
    honest.store(true, Ordering::SeqCst);
    rt.block_on(link.announce(vec![]));
    wait_until("alice writes evil.bin with the right content", || {
        fs::read(&target).is_ok_and(|b| b == *evil.data)
    });
    assert!(counter(&a, &m_id, "chunk_bytes_in") >= evil.data.len() as u64);
    wait_until("alice needs nothing more", || {
        let need = a.run(&["status", "--need", "docs", "--json"]).ok().json();
        need["need"].as_array().is_some_and(|n| n.is_empty())
    });
    if let Some(f) = corrupt_bytes_on_disk(&docs) {
        panic!("corrupt chunk bytes were written to {}", f.display());
    }
    assert_eq!(fs::read(docs.join("hello.txt")).unwrap(), HELLO);
    rt.block_on(mallory.ep.close());
}

#[test]
fn a_malformed_record_closes_the_link_and_is_counted() {
    let lab = Lab::new();
    let (a, m, _agent_a, docs) = alice_and_mallory(&lab);
    let m_id = m.id();
    let rt = runtime();
    let mallory = Mallory::new(&rt, &m, &a);
    let payload = Content::new(b"written by mallory\n".to_vec());
    let honest = Arc::new(AtomicBool::new(true));

    // A safe path, but a file kind no ferry knows.
    let mut link = rt.block_on(mallory.link());
    rt.spawn(serve(link.conn.clone(), payload.clone(), honest.clone()));
    let seq = link.next_sequence();
    let mut record = payload.record("odd.txt", mallory.me, seq);
    record.kind = 7;
    rt.block_on(link.announce(vec![record]));
    let closed = wait_for("alice closes the link over a malformed record", || {
        link.conn.close_reason()
    });
    match closed {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                VarInt::from_u32(CLOSE_PROTOCOL),
                "{close:?}"
            );
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("kind"), "{reason}");
        }
        other => panic!("expected a close with code {CLOSE_PROTOCOL}, got {other}"),
    }
    assert!(!docs.join("odd.txt").exists());
    assert_eq!(
        counter(&a, &m_id, "bad_records"),
        1,
        "a refused record is counted whichever check refused it"
    );
    rt.block_on(mallory.ep.close());
}

/// One request from Mallory on its own stream; the reply and, for a chunk,
/// its bytes.
async fn ask(conn: &Connection, req: &Request) -> (Reply, Vec<u8>) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open a request stream");
    write_msg(&mut send, req).await.expect("send the request");
    send.finish().expect("finish the request");
    let reply = read_msg::<Reply>(&mut recv)
        .await
        .expect("a reply reads")
        .expect("a reply");
    let mut data = Vec::new();
    if let Reply::Chunk { size } = reply {
        data = vec![0u8; size as usize];
        recv.read_exact(&mut data).await.expect("the chunk's bytes");
    }
    (reply, data)
}

fn chunk_of(folder: &str, path: &str, content: &[u8]) -> Request {
    Request::Chunk {
        folder: folder.into(),
        path: path.into(),
        offset: 0,
        size: content.len() as u32,
        hash: *blake3::hash(content).as_bytes(),
    }
}

#[test]
fn a_peer_reads_the_history_of_a_shared_folder_but_never_of_another() {
    const SECRET: &[u8] = b"the old secret, kept in private's history\n";
    const OLD_DOC: &[u8] = b"the old doc, kept in docs' history\n";
    let lab = Lab::new();
    let a = lab.node("alice");
    let m = lab.node("mallory");
    a.edit_config("\nlocal = false\n", "\nlocal = true\n");
    let docs = a.add_folder("docs");
    let private = a.add_folder("private");
    fs::write(docs.join("doc.txt"), OLD_DOC).unwrap();
    fs::write(private.join("secret.txt"), SECRET).unwrap();
    let _agent_a = Agent::start(&a);
    let agent_m = Agent::start(&m);
    let m_docs = m.path("docs");
    pair(
        &a,
        &m,
        &["--folder", "docs"],
        &["--into", m_docs.to_str().unwrap()],
    );
    wait_until("mallory's agent has doc.txt", || {
        m_docs.join("doc.txt").exists()
    });
    agent_m.stop();
    let m_id = m.id();
    wait_until("alice sees mallory's agent gone", || !a.connected_to(&m_id));
    // Local edits: the old contents live on only in Alice's history.
    let history = |path: &str| -> Value { a.run(&["history", path, "--json"]).ok().json() };
    let kept = |path: &str| {
        wait_for(&format!("alice keeps the old {path}"), || {
            history(path)["versions"][0]["id"].as_i64()
        })
    };
    // (A local version is kept if its chunks were stored when it was seen.)
    wait_until("alice stored both files' chunks", || {
        let st = a.run(&["history", "stats", "--json"]).ok().json();
        st["store"]["chunk_bytes"].as_u64().unwrap() >= (SECRET.len() + OLD_DOC.len()) as u64
    });
    fs::write(docs.join("doc.txt"), b"new doc").unwrap();
    fs::write(private.join("secret.txt"), b"new secret").unwrap();
    let doc_version = kept("docs:doc.txt");
    let secret_version = kept("private:secret.txt");

    let rt = runtime();
    let mallory = Mallory::new(&rt, &m, &a);
    let link = rt.block_on(mallory.link());
    rt.block_on(async {
        // docs is shared: its versions are listed, paged and served.
        let (r, _) = ask(
            &link.conn,
            &Request::History {
                folder: "docs".into(),
                path: "doc.txt".into(),
            },
        )
        .await;
        let Reply::History {
            versions,
            truncated,
        } = r
        else {
            panic!("expected docs' versions, got {r:?}");
        };
        assert!(!truncated);
        assert_eq!(versions[0].id, doc_version);
        assert_eq!(versions[0].hash, Some(*blake3::hash(OLD_DOC).as_bytes()));
        let (r, _) = ask(
            &link.conn,
            &Request::VersionChunks {
                folder: "docs".into(),
                id: doc_version,
                start: 0,
            },
        )
        .await;
        assert!(
            matches!(&r, Reply::Chunks { chunks, more: false } if chunks.len() == 1),
            "{r:?}"
        );
        let (r, data) = ask(&link.conn, &chunk_of("docs", "doc.txt", OLD_DOC)).await;
        assert!(matches!(r, Reply::Chunk { .. }), "{r:?}");
        assert_eq!(data, OLD_DOC);

        // private is not shared: nothing of its history, by any name.
        for req in [
            chunk_of("docs", "secret.txt", SECRET),
            chunk_of("docs", "doc.txt", SECRET),
            chunk_of("private", "secret.txt", SECRET),
            Request::VersionChunks {
                folder: "docs".into(),
                id: secret_version,
                start: 0,
            },
            Request::History {
                folder: "private".into(),
                path: String::new(),
            },
        ] {
            let (r, data) = ask(&link.conn, &req).await;
            assert!(matches!(r, Reply::Unavailable { .. }), "{req:?} got {r:?}");
            assert!(data.is_empty());
        }
        let (r, _) = ask(
            &link.conn,
            &Request::History {
                folder: "docs".into(),
                path: String::new(),
            },
        )
        .await;
        let Reply::History { versions, .. } = r else {
            panic!("expected docs' versions, got {r:?}");
        };
        assert!(versions.iter().all(|v| v.id != secret_version));
    });
    assert!(link.conn.close_reason().is_none());
    rt.block_on(mallory.ep.close());
}

#[test]
fn a_version_fetched_from_a_peer_that_does_not_match_its_hash_is_refused_naming_the_peer() {
    let lab = Lab::new();
    let (a, m, _agent_a, docs) = alice_and_mallory(&lab);
    let rt = runtime();
    let mallory = Mallory::new(&rt, &m, &a);
    let old = Content::new(pseudo_random(300 * 1024, 0xfeed));
    let honest = Arc::new(AtomicBool::new(false));
    let link = rt.block_on(mallory.link());
    rt.spawn(serve(link.conn.clone(), old.clone(), honest.clone()));
    let target = docs.join("old.bin");

    let listed = wait_for("alice lists the version mallory keeps", || {
        let h = a.run(&["history", "docs:old.bin", "--json"]).ok().json();
        h["peer_versions"].as_array()?.first().cloned()
    });
    assert_eq!(listed["device_holding_name"], "mallory", "{listed}");
    assert_eq!(listed["id"], 1);

    let run = a
        .run(&[
            "restore",
            "docs:old.bin",
            "--version",
            "1",
            "--from",
            "mallory",
        ])
        .exits(1);
    let line = run.error_line();
    assert!(
        line.contains("mallory sent data") && line.contains("does not match its hash"),
        "{line}"
    );
    assert!(!target.exists());
    if let Some(f) = corrupt_bytes_on_disk(&docs) {
        panic!("corrupt chunk bytes were written to {}", f.display());
    }

    // Honest bytes: restored exactly.
    honest.store(true, Ordering::SeqCst);
    a.run(&[
        "restore",
        "docs:old.bin",
        "--version",
        "1",
        "--from",
        "mallory",
    ])
    .ok();
    assert_eq!(fs::read(&target).unwrap(), *old.data);
    rt.block_on(mallory.ep.close());
}

// The cases below keep an honest third device, Bob, syncing with Alice
// while Mallory misbehaves: an attack on one link must not stop the others.

/// Alice and Mallory as in [`alice_and_mallory_with`], plus Bob, an honest
/// device sharing `docs` with Alice, whose agent keeps running.
struct Trio {
    a: Node,
    m: Node,
    b: Node,
    agent_a: Agent,
    _agent_b: Agent,
    docs: PathBuf,
    b_docs: PathBuf,
}

fn trio(lab: &Lab, setup: impl FnOnce(&Node)) -> Trio {
    let (a, m, agent_a, docs) = alice_and_mallory_with(lab, setup);
    let b = lab.node("bob");
    let agent_b = Agent::start(&b);
    let b_docs = b.path("docs");
    pair(
        &a,
        &b,
        &["--folder", "docs"],
        &["--into", b_docs.to_str().unwrap()],
    );
    wait_until("bob has hello.txt", || {
        fs::read(b_docs.join("hello.txt")).is_ok_and(|x| x == HELLO)
    });
    Trio {
        a,
        m,
        b,
        agent_a,
        _agent_b: agent_b,
        docs,
        b_docs,
    }
}

impl Trio {
    /// A file made on Bob arrives at Alice, and one made on Alice at Bob.
    #[track_caller]
    fn honest_sync_works(&self, tag: &str) {
        let from_b = format!("from-bob-{tag}.txt");
        let from_a = format!("from-alice-{tag}.txt");
        let body_b = format!("bob wrote this ({tag})\n");
        let body_a = format!("alice wrote this ({tag})\n");
        fs::write(self.b_docs.join(&from_b), &body_b).unwrap();
        fs::write(self.docs.join(&from_a), &body_a).unwrap();
        wait_until(&format!("alice gets {from_b} from bob"), || {
            fs::read(self.docs.join(&from_b)).is_ok_and(|x| x == body_b.as_bytes())
        });
        wait_until(&format!("bob gets {from_a} from alice"), || {
            fs::read(self.b_docs.join(&from_a)).is_ok_and(|x| x == body_a.as_bytes())
        });
    }

    /// Alice's agent's peak resident memory (VmHWM), in bytes.
    fn alice_peak_memory(&self) -> u64 {
        let pid = self.agent_a.pid();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("a VmHWM line");
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// Asserts that Alice's agent never held more than [`MEMORY_BOUND`].
    #[track_caller]
    fn assert_memory_bounded(&self, after: &str) {
        let peak = self.alice_peak_memory();
        eprintln!("alice's peak memory after {after}: {} MiB", peak >> 20);
        assert!(
            peak < MEMORY_BOUND,
            "alice's agent peaked at {} MiB after {after}",
            peak >> 20
        );
    }
}

/// A generous bound on an agent's peak memory: far above what syncing a few
/// small files takes, far below what honouring a hostile claim would.
const MEMORY_BOUND: u64 = 200 << 20;

/// Waits until Alice closes `conn` as a protocol violation; its reason.
fn closed_for_protocol(conn: &Connection, what: &str) -> String {
    let closed = wait_for(&format!("alice closes the link over {what}"), || {
        conn.close_reason()
    });
    match closed {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                VarInt::from_u32(CLOSE_PROTOCOL),
                "{what}: {close:?}"
            );
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        other => panic!("{what}: expected a close with code {CLOSE_PROTOCOL}, got {other}"),
    }
}

/// Waits until `status --need` on `a` gives a reason for `path` that
/// `accept`s; returns it.
fn need_reason(a: &Node, path: &str, accept: impl Fn(&str) -> bool) -> String {
    wait_for(&format!("alice says why {path} is not in sync"), || {
        let need = a.run(&["status", "--need", "docs", "--json"]).ok().json();
        let item = need["need"]
            .as_array()?
            .iter()
            .find(|i| i["path"] == path)?
            .clone();
        let reason = item["reason"].as_str()?.to_owned();
        accept(&reason).then_some(reason)
    })
}

/// Waits until Alice needs nothing more in `docs`.
fn needs_nothing(a: &Node) {
    wait_until("alice needs nothing more", || {
        let need = a.run(&["status", "--need", "docs", "--json"]).ok().json();
        need["need"].as_array().is_some_and(|n| n.is_empty())
    });
}

/// Whether any file under `dir` holds exactly `data`.
fn holds(dir: &Path, data: &[u8]) -> Option<PathBuf> {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    files
        .into_iter()
        .find(|f| fs::read(f).is_ok_and(|b| b == data))
}

#[test]
fn over_long_names_are_refused_counted_and_never_written_while_an_honest_peer_syncs() {
    let lab = Lab::new();
    let t = trio(&lab, |_| {});
    let m_id = t.m.id();
    let rt = runtime();
    let mallory = Mallory::new(&rt, &t.m, &t.a);
    let payload = Content::new(b"written under a very long name\n".to_vec());
    let honest = Arc::new(AtomicBool::new(true));
    let long_name = "n".repeat(256);
    // Each name fits, the whole is over the 4096-byte path bound.
    let long_path = vec!["d".repeat(250); 20].join("/");
    assert!(long_path.len() > 4096);
    let cases = [
        (long_name.clone(), "a name of 256 bytes"),
        (
            format!("sub/{long_name}.txt"),
            "a name of 260 bytes in a directory",
        ),
        (long_path, "a path of 5019 bytes"),
    ];
    for (n, (path, what)) in cases.iter().enumerate() {
        let mut link = rt.block_on(mallory.link());
        rt.spawn(serve(link.conn.clone(), payload.clone(), honest.clone()));
        let seq = link.next_sequence();
        rt.block_on(link.announce(vec![payload.record(path, mallory.me, seq)]));
        let reason = closed_for_protocol(&link.conn, what);
        assert!(
            reason.contains("too long") || reason.contains("a path of"),
            "{what}: {reason}"
        );
        assert_eq!(
            counter(&t.a, &m_id, "bad_records"),
            n as u64 + 1,
            "after {what}"
        );
        // Bob and Alice go on syncing both ways.
        t.honest_sync_works(&format!("long-{n}"));
    }
    assert!(
        names(&t.docs).iter().all(|n| n.len() < 200 && n != "sub"),
        "{:?}",
        names(&t.docs)
    );
    if let Some(f) = holds(&lab_root(&t), &payload.data) {
        panic!("mallory's content was written to {}", f.display());
    }
    rt.block_on(mallory.ep.close());
}

/// The directory holding every node of the lab.
fn lab_root(t: &Trio) -> PathBuf {
    t.a.dir.parent().unwrap().to_path_buf()
}

#[test]
fn names_differing_only_by_case_both_land_on_a_case_sensitive_filesystem() {
    let lab = Lab::new();
    let t = trio(&lab, |_| {});
    let m_id = t.m.id();
    let rt = runtime();
    let mallory = Mallory::new(&rt, &t.m, &t.a);
    let upper = Content::new(b"Report, capitalised\n".to_vec());
    let lower = Content::new(b"report, in lower case\n".to_vec());
    let mut link = rt.block_on(mallory.link());
    rt.spawn(serve_each(
        link.conn.clone(),
        vec![upper.clone(), lower.clone()],
    ));
    let (s1, s2) = (link.next_sequence(), link.next_sequence());
    rt.block_on(link.announce(vec![
        upper.record("Report.txt", mallory.me, s1),
        lower.record("report.txt", mallory.me, s2),
    ]));
    // Two names to this filesystem: both are files, neither overwrites the
    // other, on Alice and on Bob.
    for dir in [&t.docs, &t.b_docs] {
        wait_until(&format!("{} holds both names", dir.display()), || {
            fs::read(dir.join("Report.txt")).is_ok_and(|b| b == *upper.data)
                && fs::read(dir.join("report.txt")).is_ok_and(|b| b == *lower.data)
        });
    }
    needs_nothing(&t.a);
    assert_eq!(counter(&t.a, &m_id, "bad_records"), 0);
    assert!(link.conn.close_reason().is_none());
    t.honest_sync_works("after-case");
    rt.block_on(mallory.ep.close());
}

/// An ext4 filesystem with case folding, loop-mounted on a directory;
/// unmounted (lazily) and its image removed when dropped.
struct CasefoldMount {
    dir: PathBuf,
    image: PathBuf,
}

impl CasefoldMount {
    /// Mounts one on `dir` (made empty) with its image at `image`, its root
    /// folding case; `None` where this machine does not allow it (not root,
    /// no loop devices, a kernel without Unicode support...).
    fn new(dir: &Path, image: &Path) -> Option<Self> {
        let run = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
        fs::create_dir_all(dir).ok()?;
        fs::File::create(image)
            .and_then(|f| f.set_len(64 << 20))
            .ok()?;
        let made = run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "encoding=utf8", "-O", "casefold"])
            .arg(image));
        if !made
            || !run(Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(image)
                .arg(dir))
        {
            let _ = fs::remove_file(image);
            return None;
        }
        let mounted = Self {
            dir: dir.to_owned(),
            image: image.to_owned(),
        };
        let _ = fs::remove_dir(dir.join("lost+found"));
        run(Command::new("chattr").arg("+F").arg(dir)).then_some(mounted)
    }
}

impl Drop for CasefoldMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        let _ = fs::remove_file(&self.image);
    }
}

#[test]
fn names_differing_only_by_case_are_a_case_conflict_on_a_case_insensitive_filesystem() {
    let probe = tempfile::tempdir().unwrap();
    if CasefoldMount::new(&probe.path().join("mnt"), &probe.path().join("img")).is_none() {
        eprintln!(
            "skipped: this machine does not let the test loop-mount a case-folding ext4 \
             (needs root, loop devices and a kernel with CONFIG_UNICODE)"
        );
        return;
    }
    let lab = Lab::new();
    let mut mounted = None;
    let t = trio(&lab, |a| {
        mounted = CasefoldMount::new(&a.path("docs"), &a.dir.join("docs.img"));
    });
    assert!(
        mounted.is_some(),
        "the probe mounted, alice's folder did not"
    );
    let rt = runtime();
    let mallory = Mallory::new(&rt, &t.m, &t.a);
    let upper = Content::new(b"Report, capitalised\n".to_vec());
    let lower = Content::new(b"report, in lower case\n".to_vec());
    let mut link = rt.block_on(mallory.link());
    rt.spawn(serve_each(
        link.conn.clone(),
        vec![upper.clone(), lower.clone()],
    ));
    let (s1, s2) = (link.next_sequence(), link.next_sequence());
    rt.block_on(link.announce(vec![
        upper.record("Report.txt", mallory.me, s1),
        lower.record("report.txt", mallory.me, s2),
    ]));
    // One name to this filesystem: the first lands, the second is reported
    // and never written over it.
    let reason = need_reason(&t.a, "report.txt", |r| r.contains("case conflict"));
    assert!(reason.contains("Report.txt"), "{reason}");
    assert_eq!(fs::read(t.docs.join("Report.txt")).unwrap(), *upper.data);
    assert!(names(&t.docs).contains(&"Report.txt".to_owned()));
    assert!(!names(&t.docs).contains(&"report.txt".to_owned()));
    // Bob's case-sensitive disk takes both from Mallory's records only
    // through Alice, who has one: he gets that one.
    t.honest_sync_works("after-casefold");
    assert_eq!(fs::read(t.docs.join("Report.txt")).unwrap(), *upper.data);
    rt.block_on(mallory.ep.close());
    drop(t);
}

#[test]
fn a_name_in_nfc_and_in_nfd_are_two_files_on_linux_and_neither_is_overwritten() {
    const NFC: &str = "caf\u{e9}.txt";
    const NFD: &str = "cafe\u{301}.txt";
    assert_ne!(NFC.as_bytes(), NFD.as_bytes());
    let lab = Lab::new();
    let t = trio(&lab, |_| {});
    let m_id = t.m.id();
    let rt = runtime();
    let mallory = Mallory::new(&rt, &t.m, &t.a);
    let composed = Content::new(b"cafe, composed (NFC)\n".to_vec());
    let decomposed = Content::new(b"cafe, decomposed (NFD)\n".to_vec());
    let mut link = rt.block_on(mallory.link());
    rt.spawn(serve_each(
        link.conn.clone(),
        vec![composed.clone(), decomposed.clone()],
    ));
    let (s1, s2) = (link.next_sequence(), link.next_sequence());
    rt.block_on(link.announce(vec![
        composed.record(NFC, mallory.me, s1),
        decomposed.record(NFD, mallory.me, s2),
    ]));
    // ext4 stores names as bytes: two names, two files, each with its own
    // content (a normalising filesystem reports the second instead: see the
    // pull module's unit tests).
    for dir in [&t.docs, &t.b_docs] {
        wait_until(&format!("{} holds both forms", dir.display()), || {
            fs::read(dir.join(NFC)).is_ok_and(|b| b == *composed.data)
                && fs::read(dir.join(NFD)).is_ok_and(|b| b == *decomposed.data)
        });
    }
    needs_nothing(&t.a);
    assert_eq!(counter(&t.a, &m_id, "bad_records"), 0);
    assert!(link.conn.close_reason().is_none());
    t.honest_sync_works("after-nfd");
    rt.block_on(mallory.ep.close());
}

#[test]
fn frames_over_the_limit_or_stalled_after_a_large_claim_cost_no_memory_and_are_counted() {
    let lab = Lab::new();
    let t = trio(&lab, |_| {});
    let m_id = t.m.id();
    let rt = runtime();
    let mallory = Mallory::new(&rt, &t.m, &t.a);

    // Requests announcing the largest frame allowed, a few bytes of it sent,
    // then nothing: Alice holds only what came.
    let link = rt.block_on(mallory.link());
    let stalled = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..64 {
            let (mut send, recv) = link.conn.open_bi().await.expect("open a stream");
            send.write_all(&(MAX_FRAME as u32).to_be_bytes())
                .await
                .unwrap();
            send.write_all(&[0; 16]).await.unwrap();
            held.push((send, recv));
        }
        held
    });
    t.honest_sync_works("while-stalled");
    assert!(link.conn.close_reason().is_none());
    t.assert_memory_bounded("64 stalled frames of 1 MiB announced");

    // A request claiming 4 GB: refused on its length alone, the link closed
    // and the request counted.
    rt.block_on(async {
        let (mut send, _recv) = link.conn.open_bi().await.expect("open a stream");
        send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    });
    let reason = closed_for_protocol(&link.conn, "a 4 GB request frame");
    assert!(reason.contains("over the limit"), "{reason}");
    assert_eq!(counter(&t.a, &m_id, "bad_requests"), 1);
    drop(stalled);

    // The same claim on the index stream: refused, counted as a bad record.
    let mut link = rt.block_on(mallory.link());
    rt.block_on(async {
        link.index.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        link.index.write_all(&[0; 1024]).await.unwrap();
    });
    let reason = closed_for_protocol(&link.conn, "a 4 GB index frame");
    assert!(reason.contains("over the limit"), "{reason}");
    assert_eq!(counter(&t.a, &m_id, "bad_records"), 1);

    t.honest_sync_works("after-huge-frames");
    t.assert_memory_bounded("4 GB claims");
    rt.block_on(mallory.ep.close());
}

/// A file record as Mallory announces it, with `groups` as given and the
/// size they add up to.
fn claim(path: &str, by: DeviceId, sequence: u64, groups: Vec<WireGroup>) -> WireFile {
    let me = by.short().0;
    WireFile {
        path: path.to_owned(),
        kind: 0,
        size: groups.iter().map(|g| g.size).fold(0, u64::saturating_add),
        mtime_ns: now_ns(),
        permissions: 0o644,
        hash: Some([7; 32]),
        symlink_target: None,
        deleted: false,
        version: vec![(me, 1)],
        modified_by: me,
        sequence,
        groups,
    }
}

fn group(chunks: u32, size: u64) -> WireGroup {
    WireGroup {
        hash: *blake3::hash(&size.to_le_bytes()).as_bytes(),
        chunks,
        size,
    }
}

#[test]
fn records_claiming_absurd_sizes_are_refused_before_anything_is_allocated_or_written() {
    let lab = Lab::new();
    let t = trio(&lab, |_| {});
    let m_id = t.m.id();
    let rt = runtime();
    let mallory = Mallory::new(&rt, &t.m, &t.a);
    let me = mallory.me;
    let mut inconsistent = claim("inconsistent.bin", me, 0, vec![group(1, 1000)]);
    inconsistent.size = 1 << 40;
    let cases = [
        (
            claim("huge.bin", me, 0, vec![group(1, 1 << 62)]),
            "a file of 2^62 bytes",
        ),
        (inconsistent, "groups that do not add up to the size"),
        (
            claim("fat.bin", me, 0, vec![group(4, 4 * (1 << 20) + 1)]),
            "chunks over the chunk maximum",
        ),
        (
            claim("many.bin", me, 0, vec![group(1, 1); 16_385]),
            "16385 groups",
        ),
        (
            claim("wide.bin", me, 0, vec![group(1025, 1025)]),
            "a group of 1025 chunks",
        ),
    ];
    for (n, (mut record, what)) in cases.into_iter().enumerate() {
        let mut link = rt.block_on(mallory.link());
        record.sequence = link.next_sequence();
        let path = record.path.clone();
        rt.block_on(link.announce(vec![record]));
        closed_for_protocol(&link.conn, what);
        assert_eq!(
            counter(&t.a, &m_id, "bad_records"),
            n as u64 + 1,
            "after {what}"
        );
        assert!(!t.docs.join(&path).exists(), "{what}");
    }
    t.honest_sync_works("after-absurd");
    t.assert_memory_bounded("absurd records");

    // A well-formed record of a file far larger than any disk here (15 TiB):
    // not a protocol violation, but the pull fails before fetching a byte,
    // saying why, and leaves nothing behind.
    let mut link = rt.block_on(mallory.link());
    rt.spawn(serve(
        link.conn.clone(),
        Content::new(b"unused".to_vec()),
        Arc::new(AtomicBool::new(true)),
    ));
    let seq = link.next_sequence();
    let giant = claim("giant.bin", me, seq, vec![group(1024, 1 << 30); 15 * 1024]);
    rt.block_on(link.announce(vec![giant]));
    let reason = need_reason(&t.a, "giant.bin", |r| r.contains("space"));
    assert!(reason.contains("No space left on device"), "{reason}");
    assert!(link.conn.close_reason().is_none());
    assert!(!t.docs.join("giant.bin").exists());
    let temps: Vec<String> = names(&t.docs)
        .into_iter()
        .filter(|n| n.starts_with(".ferry-tmp-"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
    assert_eq!(counter(&t.a, &m_id, "chunk_bytes_in"), 0);
    t.honest_sync_works("after-giant");
    rt.block_on(mallory.ep.close());
}

#[test]
fn a_flood_of_requests_is_served_within_bounds_while_an_honest_peer_syncs() {
    const TASKS: u64 = 64;
    const REQUESTS: u64 = TASKS * 64;
    let lab = Lab::new();
    let t = trio(&lab, |_| {});
    let m_id = t.m.id();
    let rt = runtime();
    let mallory = Mallory::new(&rt, &t.m, &t.a);
    let mut link = rt.block_on(mallory.link());
    let conn = link.conn.clone();

    // Chunk requests for chunks nobody has (as large as allowed, named at a
    // real file) and whole-folder history reads, from many tasks at once,
    // each asking again as soon as it has its answer.
    let answered = Arc::new(AtomicU64::new(0));
    let flood: Vec<_> = (0..TASKS)
        .map(|task| {
            let conn = conn.clone();
            let answered = answered.clone();
            rt.spawn(async move {
                for i in 0..REQUESTS / TASKS {
                    let req = if i % 8 == 7 {
                        Request::History {
                            folder: "docs".into(),
                            path: String::new(),
                        }
                    } else {
                        Request::Chunk {
                            folder: "docs".into(),
                            path: "hello.txt".into(),
                            offset: 0,
                            size: 1 << 20,
                            hash: *blake3::hash(&(task * 1_000_000 + i).to_le_bytes()).as_bytes(),
                        }
                    };
                    let (reply, _) = ask(&conn, &req).await;
                    match (&req, &reply) {
                        (Request::Chunk { .. }, Reply::Unavailable { .. })
                        | (Request::History { .. }, Reply::History { .. }) => {}
                        _ => panic!("{req:?} got {reply:?}"),
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Uni-streams parked full of bytes Alice never reads (a stream's whole
    // window each): QUIC's limits must keep what she buffers for them small.
    // A stream Alice gives no credit for within a few seconds is taken as
    // refused (a slow machine only makes Mallory park fewer).
    let parked = {
        let conn = conn.clone();
        rt.spawn(async move {
            let patience = std::time::Duration::from_secs(2);
            let junk = vec![0x55u8; 1_250_000];
            let mut held = Vec::new();
            for _ in 0..100 {
                let Ok(Ok(mut s)) = tokio::time::timeout(patience, conn.open_uni()).await else {
                    break;
                };
                if !matches!(
                    tokio::time::timeout(patience, s.write_all(&junk)).await,
                    Ok(Ok(()))
                ) {
                    break;
                }
                held.push(s);
            }
            held
        })
    };
    // Index updates as fast as Mallory can send them (each one empty: a
    // nudge to look at the folder again).
    rt.block_on(async {
        for _ in 0..2000 {
            link.announce(vec![]).await;
        }
    });

    // Bob's sync with Alice goes on, a larger file included.
    let big = pseudo_random(3 << 20, 0xf100d);
    fs::write(t.b_docs.join("big.bin"), &big).unwrap();
    t.honest_sync_works("during-flood");
    wait_until("alice gets big.bin from bob", || {
        fs::read(t.docs.join("big.bin")).is_ok_and(|b| b == big)
    });
    for task in flood {
        rt.block_on(task).expect("a flood task failed");
    }
    let parked = rt.block_on(parked).expect("the parking task");
    eprintln!("mallory parked {} uni-streams", parked.len());
    assert!(
        parked.len() < ferry::transport::MAX_UNI_STREAMS as usize,
        "{} uni-streams parked beside the index stream",
        parked.len()
    );
    assert_eq!(answered.load(Ordering::Relaxed), REQUESTS);
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    assert_eq!(counter(&t.a, &m_id, "bad_requests"), 0);
    t.honest_sync_works("after-flood");
    t.assert_memory_bounded("a flood of requests");
    drop(parked);
    rt.block_on(mallory.ep.close());
}

#[test]
fn a_peer_that_stalls_is_timed_out_named_in_status_and_asked_last() {
    let lab = Lab::new();
    let t = trio(&lab, |a| {
        a.edit_config("request_timeout_secs = 60", "request_timeout_secs = 3")
    });
    let m_id = t.m.id();
    let rt = runtime();
    let mallory = Mallory::new(&rt, &t.m, &t.a);
    let shared = Content::new(pseudo_random(10_000, 0x57a11));
    assert_eq!(shared.digest.chunks.len(), 1);
    let mut link = rt.block_on(mallory.link());

    // Mallory takes every request and never answers it.
    let (asked, let_go) = never_answer(&rt, &link.conn);
    // And on a stream of her own, half a request frame, then nothing.
    let (half, mut half_reply) = rt.block_on(async {
        let (mut s, r) = link.conn.open_bi().await.expect("open a stream");
        let frame = ferry::protocol::encode(&chunk_of("docs", "hello.txt", HELLO));
        s.write_all(&frame[..frame.len() / 2]).await.unwrap();
        (s, r)
    });

    // A file only Mallory has (yet), announced with the version Bob will
    // give it: Alice asks Mallory, gets nothing, and says so.
    let b_short = t.b.id().parse::<DeviceId>().unwrap().short().0;
    let mut record = shared.record("shared.bin", mallory.me, link.next_sequence());
    record.version = vec![(b_short, 1)];
    record.modified_by = b_short;
    rt.block_on(link.announce(vec![record]));
    let reason = need_reason(&t.a, "shared.bin", |r| r.contains("no answer"));
    assert!(reason.contains("no answer within 3 s"), "{reason}");
    assert!(counter(&t.a, &m_id, "stalled_requests") >= 1);
    // Alice gave up the stalled requests (her end is dropped, not kept).
    wait_until("alice lets go of every request she gave up on", || {
        let n = asked.load(Ordering::Relaxed);
        n >= 1 && let_go.load(Ordering::Relaxed) == n
    });
    // And the half frame she was reading: her end of it is closed too.
    rt.block_on(async {
        let stopped = tokio::time::timeout(agent::PATIENCE, half.stopped())
            .await
            .expect("alice drops a half-sent request within the patience");
        assert!(stopped.is_ok(), "{stopped:?}");
        let mut buf = [0u8; 16];
        let end = tokio::time::timeout(agent::PATIENCE, half_reply.read(&mut buf))
            .await
            .expect("alice ends her side of the half-sent request");
        assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    });
    assert!(link.conn.close_reason().is_none());
    t.honest_sync_works("while-mallory-stalls");

    // Bob makes the same file: Alice fetches it from Bob (Mallory, who
    // stalled, is asked last), whatever Mallory keeps doing.
    fs::write(t.b_docs.join("shared.bin"), &*shared.data).unwrap();
    wait_until("alice gets shared.bin from bob", || {
        fs::read(t.docs.join("shared.bin")).is_ok_and(|b| b == *shared.data)
    });
    needs_nothing(&t.a);
    t.honest_sync_works("after-stall");

    // Half an index update, then nothing: only this link's index receiver
    // waits on it; Bob's sync with Alice goes on.
    let frame = ferry::protocol::encode(&IndexMessage::Update {
        folder: "docs".into(),
        epoch: link.epoch,
        sequence: link.sequence + 1,
        files: vec![shared.record("late.bin", mallory.me, link.sequence + 1)],
    });
    rt.block_on(link.index.write_all(&frame[..frame.len() / 2]))
        .unwrap();
    t.honest_sync_works("after-half-index-frame");
    assert!(link.conn.close_reason().is_none());
    assert!(!t.docs.join("late.bin").exists());
    rt.block_on(mallory.ep.close());
}

/// Alice sends chunks of a large file unchanged since its scan without hashing
/// them again (vouched for by the chunk list she recorded with its stat). A
/// file edited in place since must never be served from that list: whatever
/// Mallory asks, a chunk Alice sends is the chunk asked for.
#[test]
fn a_large_file_edited_in_place_is_never_served_by_its_old_chunk_list() {
    let lab = Lab::new();
    let data = pseudo_random(8 << 20, 41);
    let (a, m, _agent_a, docs) = alice_and_mallory_sharing(&lab, |_| {}, "big.bin", &data);

    let chunks = chunk_bytes(&data, DEFAULT_PARAMS).chunks;
    assert!(chunks.len() > 20, "{} chunks", chunks.len());
    let ask_at = |c: &ferry::chunking::ChunkInfo, offset: u64| Request::Chunk {
        folder: "docs".into(),
        path: "big.bin".into(),
        offset,
        size: c.len,
        hash: c.hash.0,
    };
    let bytes_of = |c: &ferry::chunking::ChunkInfo| {
        data[c.offset as usize..(c.offset + c.len as u64) as usize].to_vec()
    };
    let rt = runtime();
    let mallory = Mallory::new(&rt, &m, &a);
    let link = rt.block_on(mallory.link());
    rt.block_on(async {
        // Twice each: the first request reads the list, the next use it.
        for c in chunks
            .iter()
            .skip(5)
            .take(10)
            .chain(chunks.iter().skip(5).take(10))
        {
            let (r, got) = ask(&link.conn, &ask_at(c, c.offset)).await;
            assert!(matches!(r, Reply::Chunk { .. }), "{r:?}");
            assert_eq!(got, bytes_of(c), "chunk at {}", c.offset);
        }
        // A chunk named at another chunk's place is found where it is.
        let (c, wrong) = (&chunks[8], chunks[9].offset);
        let (r, got) = ask(&link.conn, &ask_at(c, wrong)).await;
        assert!(matches!(r, Reply::Chunk { .. }), "{r:?}");
        assert_eq!(got, bytes_of(c));
    });

    // Edited in place (same size, same inode): every chunk from the middle
    // on changes, the stat with them.
    let target = &chunks[chunks.len() / 2];
    let mut edited = data.clone();
    for b in &mut edited[target.offset as usize..] {
        *b = !*b;
    }
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(docs.join("big.bin"))
            .unwrap();
        f.seek(SeekFrom::Start(target.offset)).unwrap();
        f.write_all(&edited[target.offset as usize..]).unwrap();
        f.sync_all().unwrap();
    }
    rt.block_on(async {
        for c in &chunks[chunks.len() / 2..chunks.len() / 2 + 10] {
            let (r, got) = ask(&link.conn, &ask_at(c, c.offset)).await;
            if let Reply::Chunk { .. } = r {
                // Only the old bytes (from Alice's history) may answer.
                assert_eq!(
                    got,
                    bytes_of(c),
                    "alice sent other bytes for the chunk at {}",
                    c.offset
                );
            }
        }
    });
}
