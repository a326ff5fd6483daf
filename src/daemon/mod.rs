//! The background agent: holds the home's lock, runs the iroh endpoint with its
//! protocol handlers, keeps links to paired devices, serves the local control
//! API, and shuts all of it down cleanly on SIGINT/SIGTERM.

pub mod control;
mod history;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use iroh::Endpoint;
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use serde_json::{Value, json};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use self::control::{Request, Response};
use crate::config::NetworkConfig;
use crate::device::DeviceId;
use crate::folder::{self, FolderId, NewFolder};
use crate::history::store::ChunkStore;
use crate::home::Home;
use crate::index::{SharedIndex, now_secs};
use crate::pairing::code::InviteCode;
use crate::pairing::handshake::{self, Invites};
use crate::peers::{FirstDial, Peers};
use crate::protocol::{PAIR_ALPN, SYNC_ALPN};
use crate::sync::Engine;
use crate::transport::{self, AllowList};

const LOCK_FILE: &str = "agent.lock";
const PORT_FILE: &str = "agent.port";
/// Longest invite lifetime accepted.
pub const MAX_INVITE_SECS: u64 = 7 * 24 * 3600;

/// How the agent is started.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Turn off relays, internet discovery and port mapping.
    pub offline: bool,
    /// Listen here instead of `network.listen`.
    pub listen: Option<SocketAddr>,
}

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another agent holds the home.
    #[error("another ferry agent is already running for home {home}{pid}")]
    AlreadyRunning {
        /// The home.
        home: PathBuf,
        /// ", pid N" when known.
        pid: String,
    },
    /// The home could not be used.
    #[error(transparent)]
    Home(#[from] crate::home::HomeError),
    /// The index failed.
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    /// The endpoint could not be set up.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    /// The history's chunk store could not be opened.
    #[error(transparent)]
    History(#[from] crate::history::store::StoreError),
    /// A file of the agent's could not be used.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Holds `agent.lock` with `flock` for the agent's lifetime; the kernel drops
/// the lock if the process dies, so a crash never leaves a stale lock.
struct HomeLock {
    _file: File,
}

fn lock_home(home: &Path) -> Result<HomeLock, DaemonError> {
    let path = home.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let pid = std::fs::read_to_string(&path)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .map(|p| format!(", pid {p}"))
            .unwrap_or_default();
        return Err(DaemonError::AlreadyRunning {
            home: home.to_owned(),
            pid,
        });
    }
    file.set_len(0).map_err(io_err(&path))?;
    writeln!(file, "{}", std::process::id()).map_err(io_err(&path))?;
    Ok(HomeLock { _file: file })
}

/// Everything the control API and protocol handlers share.
struct Agent {
    home: Home,
    index: SharedIndex,
    ep: Endpoint,
    allow: AllowList,
    peers: Arc<Peers>,
    engine: Arc<Engine>,
    invites: Arc<Invites>,
    store: ChunkStore,
    /// Settings changed in the file that take effect only after a restart.
    restart_needed: std::sync::Mutex<Vec<String>>,
    /// Long operations running for CLI commands (recoveries, restores).
    operations: crate::progress::Operations,
}

#[derive(Debug, Clone)]
struct SyncHandler(Arc<Peers>);

impl ProtocolHandler for SyncHandler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        self.0.accept(conn).await;
        Ok(())
    }
}

#[derive(Clone)]
struct PairHandler(Arc<Agent>);

impl std::fmt::Debug for PairHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairHandler")
    }
}

impl ProtocolHandler for PairHandler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let agent = self.0.clone();
        let me = agent.home.device_id();
        let record = async |req: &handshake::Request,
                            admission: &handshake::Admission|
               -> Result<String, String> {
            let (joiner, name, addrs) = (req.joiner, req.name.clone(), req.addrs.clone());
            let folder = admission.folder.clone();
            agent
                .index
                .run(move |i| {
                    i.add_peer(joiner, &name, &addrs)?;
                    if let Some(f) = folder {
                        let fid = FolderId::new(&f.id)
                            .map_err(|e| crate::index::IndexError::Corrupt(e.to_string()))?;
                        if f.encrypted {
                            i.add_vault_holder(&fid, &joiner)?;
                        } else {
                            i.share_folder(&fid, &joiner)?;
                        }
                    }
                    Ok::<_, crate::index::IndexError>(())
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok(agent.home.config().device.name.clone())
        };
        match handshake::answer(conn, &self.0.invites, me, record).await {
            Ok(req) => {
                tracing::info!(device = %req.joiner, name = %req.name, "paired");
                self.0.engine.shares_changed();
                self.0.peers.watch(req.joiner, FirstDial::Later);
            }
            Err(e) => tracing::warn!("a pairing attempt failed: {e}"),
        }
        Ok(())
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(home: Home, opts: DaemonOptions) -> Result<(), DaemonError> {
    let _lock = lock_home(home.root())?;
    let mut index = home.index()?;
    let store = ChunkStore::open(&crate::history::store_dir(home.root()), &index)?;
    let moved = crate::sync::holder::move_legacy_chunks(&mut index, &store)?;
    if moved > 0 {
        tracing::info!(
            chunks = moved,
            "moved held sealed chunks into the chunk store"
        );
    }
    let index = SharedIndex::new(index);

    let mut net: NetworkConfig = home.config().network.clone();
    if opts.offline {
        net = net.offline();
    }
    let listen = match opts.listen {
        Some(a) => a,
        None => net
            .listen
            .parse()
            .expect("network.listen was validated when the config was read"),
    };
    let allow = AllowList::default();
    let ep = bind_remembering_port(&home, &net, listen, allow.clone()).await?;

    let shutdown = CancellationToken::new();
    let engine = Engine::new(home.clone(), index.clone(), shutdown.child_token());
    let peers = Peers::new(
        ep.clone(),
        allow.clone(),
        index.clone(),
        home.config().device.name.clone(),
        shutdown.child_token(),
        engine.clone(),
    );
    let agent = Arc::new(Agent {
        home: home.clone(),
        index,
        ep: ep.clone(),
        allow,
        peers: peers.clone(),
        engine: engine.clone(),
        invites: Arc::new(Invites::default()),
        store: store.clone(),
        restart_needed: std::sync::Mutex::new(Vec::new()),
        operations: crate::progress::Operations::default(),
    });
    let router = Router::builder(ep.clone())
        .accept(SYNC_ALPN, SyncHandler(peers.clone()))
        .accept(PAIR_ALPN, PairHandler(agent.clone()))
        .spawn();
    engine.start().await?;
    peers.start().await?;

    let sock = control::socket_path(home.root());
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(io_err(&sock))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(&sock))?;
    let control_task = tokio::spawn(serve_control(listener, agent.clone(), shutdown.clone()));
    let history_task = tokio::spawn(history::run(
        home.clone(),
        store,
        engine.clone(),
        shutdown.child_token(),
    ));

    tracing::info!(
        device = %home.device_id(),
        addrs = ?transport::direct_addrs(&ep),
        "agent running"
    );
    eprintln!(
        "ferry agent running: device {} listening on {}",
        home.device_id(),
        ep.bound_sockets()
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    wait_for_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    let _ = stopping("the control socket", control_task).await;
    let _ = stopping("the history pass", history_task).await;
    stopping("the links", peers.shutdown()).await;
    stopping("the folders", engine.shutdown()).await;
    if let Err(e) = stopping("the router", router.shutdown()).await {
        tracing::warn!("router shutdown: {e}");
    }
    stopping("the endpoint", ep.close()).await;
    let _ = std::fs::remove_file(&sock);
    drop(agent);
    eprintln!("ferry agent stopped");
    Ok(())
}

/// Awaits one step of the shutdown, saying which one holds it up when it
/// takes more than a few seconds.
async fn stopping<T>(what: &str, step: impl std::future::Future<Output = T>) -> T {
    let step = std::pin::pin!(step);
    let mut step = step;
    tokio::select! {
        r = &mut step => r,
        _ = tokio::time::sleep(Duration::from_secs(5)) => {
            tracing::warn!("shutting down: still waiting for {what}");
            step.await
        }
    }
}

/// Binds the endpoint; with port 0, reuses the port of the last run when it is
/// free, so peers find this device where they last saw it.
async fn bind_remembering_port(
    home: &Home,
    net: &NetworkConfig,
    listen: SocketAddr,
    allow: AllowList,
) -> Result<Endpoint, DaemonError> {
    let port_file = home.root().join(PORT_FILE);
    let remembered = std::fs::read_to_string(&port_file)
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok());
    let secret = home.secret_key().clone();
    let ep = match remembered {
        Some(p) if listen.port() == 0 => {
            let again = SocketAddr::new(listen.ip(), p);
            match transport::bind(secret.clone(), net, again, allow.clone()).await {
                Ok(ep) => ep,
                Err(e) => {
                    tracing::info!("port {p} is taken ({e}); picking another");
                    transport::bind(secret, net, listen, allow).await?
                }
            }
        }
        _ => transport::bind(secret, net, listen, allow).await?,
    };
    if listen.port() == 0
        && let Some(a) = ep.bound_sockets().first()
    {
        std::fs::write(&port_file, format!("{}\n", a.port())).map_err(io_err(&port_file))?;
    }
    Ok(ep)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn serve_control(listener: UnixListener, agent: Arc<Agent>, shutdown: CancellationToken) {
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let agent = agent.clone();
                    tasks.spawn(async move { handle_control(stream, agent).await });
                }
                Err(e) => tracing::warn!("control socket: {e}"),
            },
            _ = shutdown.cancelled() => break,
        }
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(20), tasks.wait()).await;
}

async fn handle_control(stream: UnixStream, agent: Arc<Agent>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(control::MAX_MESSAGE));
    let response = match reader.read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => match dispatch(&agent, req).await {
                Ok(v) => Response {
                    ok: true,
                    result: Some(v),
                    error: None,
                },
                Err(e) => Response {
                    ok: false,
                    result: None,
                    error: Some(e),
                },
            },
            Err(e) => Response {
                ok: false,
                result: None,
                error: Some(format!("bad request: {e}")),
            },
        },
        Err(e) => Response {
            ok: false,
            result: None,
            error: Some(format!("bad request: {e}")),
        },
    };
    let mut out = serde_json::to_vec(&response).expect("responses serialize");
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

async fn dispatch(agent: &Arc<Agent>, req: Request) -> Result<Value, String> {
    match req {
        Request::Status => Ok(json!({
            "pid": std::process::id(),
            "device_id": agent.home.device_id().to_string(),
            "name": agent.home.config().device.name,
            "addresses": transport::direct_addrs(&agent.ep),
            "relay": transport::relay_url(&agent.ep),
            "refused_links": agent.allow.refused(),
            "config_restart_needed": *agent.restart_needed.lock().expect("restart lock"),
            "operations": agent.operations.list(),
            "folders": agent.engine.statuses(),
        })),
        Request::Revert { folder } => {
            let h = folder_handle(agent, &folder)?;
            if h.folder().folder_type != crate::folder::FolderType::ReceiveOnly {
                return Err(format!(
                    "folder {folder} is not receive-only; only a receive-only folder's local changes can be reverted"
                ));
            }
            h.revert.store(true, std::sync::atomic::Ordering::SeqCst);
            h.scan_now.notify_one();
            Ok(json!({ "reverting": folder }))
        }
        Request::ConfirmDeletes { folder } => {
            let h = folder_handle(agent, &folder)?;
            let deleted = agent
                .engine
                .scan_folder(&h, true)
                .await
                .ok_or_else(|| format!("the scan of {folder} failed; see `ferry status`"))?;
            h.remote_changed.notify_one();
            Ok(json!({ "deleted": deleted }))
        }
        Request::Reload => {
            agent
                .engine
                .reload_folders()
                .await
                .map_err(|e| e.to_string())?;
            let peers = agent.index.run(|i| i.peers()).await?;
            for p in peers {
                agent.peers.announce_folders(&p.id).await;
            }
            Ok(json!({ "reloaded": true }))
        }
        Request::ReloadConfig => reload_config(agent).await,
        Request::Restore {
            folder,
            path,
            version,
            at,
            recursive,
        } => history::restore(agent.history(), folder, path, version, at, recursive).await,
        Request::Resolve { folder, path, keep } => {
            history::resolve(agent.history(), folder, path, keep).await
        }
        Request::History { folder, path } => {
            history::peer_history(agent.history(), folder, path).await
        }
        Request::RestoreRemote {
            folder,
            path,
            device,
            version,
            to,
            force,
        } => {
            history::restore_remote(
                agent.history(),
                history::RemoteRestore {
                    folder,
                    path,
                    device,
                    version,
                    to,
                    force,
                },
            )
            .await
        }
        Request::Invite {
            folder,
            encrypted,
            expires_secs,
        } => invite(agent, folder, encrypted, expires_secs).await,
        Request::Recover {
            from,
            key,
            into,
            at,
        } => recover(agent, &from, &key, into, at).await,
        Request::Join {
            code,
            into,
            name,
            folder_type,
        } => {
            let folder_type = folder_type
                .as_deref()
                .map(str::parse::<crate::folder::FolderType>)
                .transpose()
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
            join(agent, &code, into, name, folder_type).await
        }
        Request::Devices => {
            let list = agent.peers.status().await.map_err(|e| e.to_string())?;
            Ok(serde_json::to_value(list).expect("status serializes"))
        }
        Request::RemoveDevice { id } => {
            let id: DeviceId = id
                .parse()
                .map_err(|e| format!("invalid device id {id:?}: {e}"))?;
            let removed = agent
                .index
                .run(move |i| i.remove_peer(&id))
                .await
                .map_err(|e| e.to_string())?;
            if !removed {
                return Err(format!("no paired device {id} (see `ferry devices`)"));
            }
            agent.peers.forget(&id);
            Ok(json!({ "removed": id.to_string() }))
        }
        Request::Share {
            folder,
            device,
            encrypted,
        } => {
            let fid = FolderId::new(&folder).map_err(|e| e.to_string())?;
            let did: DeviceId = device
                .parse()
                .map_err(|e| format!("invalid device id {device:?}: {e}"))?;
            let f2 = fid.clone();
            agent
                .index
                .run(move |i| {
                    if i.folder(&f2)?.is_none() {
                        return Err(unknown_folder(f2.as_str()));
                    }
                    if i.peer(&did)?.is_none() {
                        return Err(format!("no paired device {did} (see `ferry devices`)"));
                    }
                    if encrypted {
                        i.add_vault_holder(&f2, &did)?;
                    } else {
                        i.share_folder(&f2, &did)?;
                    }
                    Ok(())
                })
                .await?;
            agent.engine.shares_changed();
            agent.peers.announce_folders(&did).await;
            Ok(json!({ "folder": fid.as_str(), "device": did.to_string(), "encrypted": encrypted }))
        }
    }
}

/// Reads `config.toml` again and takes on what can change while running.
async fn reload_config(agent: &Arc<Agent>) -> Result<Value, String> {
    use crate::config::edit;
    let file = agent.home.read_config().map_err(|e| e.to_string())?;
    let running = agent.home.config();
    let next = edit::live_part(&running, &file);
    let applied = edit::changed(&running, &next);
    let restart = edit::changed(&next, &file);
    if !applied.is_empty() {
        agent.home.set_config(next);
        let local = agent.home.config().local_history();
        agent.index.run(move |i| i.set_local_history(local)).await;
        agent.engine.config_changed();
        tracing::info!(settings = ?applied, "config reloaded");
    }
    *agent.restart_needed.lock().expect("restart lock") = restart.clone();
    Ok(json!({ "applied": applied, "restart_needed": restart }))
}

impl Agent {
    fn history(&self) -> history::Ctx<'_> {
        history::Ctx {
            home: &self.home,
            store: &self.store,
            engine: &self.engine,
            operations: &self.operations,
        }
    }
}

fn unknown_folder(id: &str) -> String {
    folder::FolderError::Unknown(id.to_owned()).to_string()
}

/// The engine's handle of a folder, or the error the CLI shows.
fn folder_handle(agent: &Agent, id: &str) -> Result<Arc<crate::sync::FolderHandle>, String> {
    agent.engine.folder(id).ok_or_else(|| unknown_folder(id))
}

impl From<crate::index::IndexError> for String {
    fn from(e: crate::index::IndexError) -> Self {
        e.to_string()
    }
}

async fn invite(
    agent: &Arc<Agent>,
    folder: Option<String>,
    encrypted: bool,
    expires_secs: u64,
) -> Result<Value, String> {
    if encrypted && folder.is_none() {
        return Err("--encrypted needs --folder: the folder the joiner holds encrypted".into());
    }
    if expires_secs == 0 || expires_secs > MAX_INVITE_SECS {
        return Err(format!(
            "an invite must expire within 1 s to {} days",
            MAX_INVITE_SECS / 86_400
        ));
    }
    let offer = match folder {
        None => None,
        Some(id) => {
            let fid = FolderId::new(&id).map_err(|e| e.to_string())?;
            let (f, secret) = agent
                .index
                .run(move |i| -> Result<_, crate::index::IndexError> {
                    let Some(f) = i.folder(&fid)? else {
                        return Ok(None);
                    };
                    let secret = i.folder_secret(f.row)?;
                    Ok(Some((f, secret)))
                })
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| unknown_folder(&id))?;
            Some(crate::sync::wire::offer_to_wire(crate::index::Offered {
                id: f.id.to_string(),
                label: f.label,
                encrypted,
                secret: Some(secret),
            }))
        }
    };
    let expires_at = now_secs() as u64 + expires_secs;
    let code = InviteCode::new(
        agent.ep.id(),
        transport::direct_addrs(&agent.ep),
        transport::relay_url(&agent.ep),
        expires_at,
    );
    agent.invites.add(&code, offer);
    Ok(json!({ "code": code.encode(), "expires_at": expires_at }))
}

/// Rebuilds a folder from a backup holder, then keeps it as an ordinary
/// folder of this device that the holder goes on holding.
async fn recover(
    agent: &Arc<Agent>,
    from: &str,
    key: &str,
    into: PathBuf,
    at: Option<i64>,
) -> Result<Value, String> {
    let secret = crate::vault::FolderSecret::from_recovery_code(key).map_err(|e| e.to_string())?;
    let holder = history::paired_device(&agent.home, from).await?;
    agent.peers.watch(holder, FirstDial::Now);
    let mut conn = None;
    for _ in 0..100 {
        conn = agent.engine.link(&holder);
        if conn.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conn = conn.ok_or_else(|| format!("cannot reach holder {holder}: it is not connected"))?;
    let into = if into.is_absolute() {
        into
    } else {
        return Err(format!("{}: give an absolute path", into.display()));
    };
    let taken: std::collections::HashSet<String> = agent
        .index
        .run(|i| -> Result<_, crate::index::IndexError> {
            let mut ids: std::collections::HashSet<String> =
                i.folders()?.into_iter().map(|f| f.id.to_string()).collect();
            ids.extend(i.vaults()?.into_iter().map(|v| v.folder_id));
            Ok(ids)
        })
        .await
        .map_err(|e| e.to_string())?;
    let running = agent.operations.start("recover", "");
    let got = crate::sync::recover::recover(&conn, holder, &secret, &into, at, &taken, &running)
        .await
        .map_err(|e| e.to_string())?;
    let r = got.clone();
    let path = agent
        .index
        .run(move |i| -> Result<PathBuf, String> {
            let added = folder::add(
                i,
                NewFolder {
                    path: into,
                    id: Some(r.folder.clone()),
                    label: Some(r.label.clone()),
                    folder_type: crate::folder::FolderType::SendReceive,
                },
            )
            .map_err(|e| format!("recovered, but the folder could not be added: {e}"))?;
            i.set_folder_secret(added.row, &secret)?;
            i.add_vault_holder(&r.folder, &holder)?;
            i.set_holder_state(
                added.row,
                &holder,
                crate::index::HolderState {
                    pushed: 0,
                    history: 0,
                    revision: r.revision,
                },
            )?;
            Ok(added.path)
        })
        .await?;
    agent.engine.shares_changed();
    if let Err(e) = agent.engine.reload_folders().await {
        tracing::warn!("cannot load the recovered folder: {e}");
    }
    agent.peers.announce_folders(&holder).await;
    Ok(json!({
        "folder": got.folder.as_str(),
        "label": got.label,
        "path": path,
        "files": got.files,
        "bytes": got.bytes,
        "holder": holder.to_string(),
    }))
}

async fn join(
    agent: &Arc<Agent>,
    text: &str,
    into: Option<PathBuf>,
    name: Option<String>,
    folder_type: crate::folder::FolderType,
) -> Result<Value, String> {
    let code = InviteCode::decode(text).map_err(|e| e.to_string())?;
    let me = agent.home.device_id();
    let inviter = DeviceId::new(code.inviter);
    if inviter == me {
        return Err(handshake::PairError::OwnCode.to_string());
    }
    let now = now_secs() as u64;
    if code.is_expired(now) {
        return Err(handshake::PairError::Expired(now - code.expires_at).to_string());
    }
    // Allow the inviter's sync link now: it dials back as soon as it has
    // recorded the pairing, possibly before this side has.
    let was_paired = agent.allow.contains(&inviter);
    agent.allow.insert(inviter);
    let result = async {
        let conn = transport::dial(&agent.ep, inviter, &code.addrs, PAIR_ALPN)
            .await
            .map_err(|e| e.to_string())?;
        let joined = handshake::join(
            &conn,
            &code,
            me,
            &agent.home.config().device.name,
            transport::direct_addrs(&agent.ep),
        )
        .await
        .map_err(|e| e.to_string())?;
        conn.close(0u32.into(), b"paired");
        Ok::<_, String>(joined)
    }
    .await;
    let joined = match result {
        Ok(j) => j,
        Err(e) => {
            if !was_paired {
                agent.allow.remove(&inviter);
            }
            return Err(e);
        }
    };
    let peer_name = name.unwrap_or_else(|| joined.name.clone());
    let addrs = code.addrs.clone();
    let folder = joined.folder.clone();
    let folder_path = agent
        .index
        .run(move |i| -> Result<Option<PathBuf>, String> {
            i.add_peer(inviter, &peer_name, &addrs)?;
            let Some(f) = folder else { return Ok(None) };
            if f.encrypted {
                // Joining with the code is the holder's consent: it keeps the
                // folder sealed, with no path and no key.
                i.add_vault(&f.id, &inviter, &f.label)?;
                return Ok(None);
            }
            let Some(into) = into else {
                i.record_offers(&inviter, &[crate::sync::wire::offer_from_wire(f)])?;
                return Ok(None);
            };
            std::fs::create_dir_all(&into)
                .map_err(|e| format!("cannot create {}: {e}", into.display()))?;
            let fid = FolderId::new(&f.id).map_err(|e| e.to_string())?;
            let added = folder::add(
                i,
                NewFolder {
                    path: into,
                    id: Some(fid.clone()),
                    label: Some(f.label),
                    folder_type,
                },
            )
            .map_err(|e| format!("paired, but the shared folder could not be added: {e}"))?;
            if let Some(secret) = f.secret {
                i.set_folder_secret(added.row, &crate::vault::FolderSecret::from_bytes(secret))?;
            }
            i.share_folder(&fid, &inviter)?;
            Ok(Some(added.path))
        })
        .await;
    agent.engine.shares_changed();
    if let Err(e) = agent.engine.reload_folders().await {
        tracing::warn!("cannot load the new folder: {e}");
    }
    agent.peers.watch(inviter, FirstDial::Now);
    let folder_path = folder_path?;
    Ok(json!({
        "device": inviter.to_string(),
        "name": joined.name,
        // Never the folder's secret: this goes to the CLI.
        "folder": joined.folder.as_ref().map(|f| json!({
            "id": f.id, "label": f.label, "encrypted": f.encrypted,
        })),
        "folder_path": folder_path,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_home_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_home(dir.path()).unwrap();
        let err = lock_home(dir.path()).err().unwrap();
        assert!(
            err.to_string().contains("already running") && err.to_string().contains("pid"),
            "{err}"
        );
        drop(first);
        assert!(lock_home(dir.path()).is_ok());
    }

    #[test]
    fn the_control_request_format_is_stable() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"invite","folder":null,"expires_secs":60}"#).unwrap();
        assert_eq!(
            r,
            Request::Invite {
                folder: None,
                encrypted: false,
                expires_secs: 60
            }
        );
        let line = serde_json::to_string(&Request::RemoveDevice { id: "x".into() }).unwrap();
        assert_eq!(line, r#"{"cmd":"remove-device","id":"x"}"#);
        let r: Request =
            serde_json::from_str(r#"{"cmd":"restore","folder":"docs","path":"a.txt"}"#).unwrap();
        assert_eq!(
            r,
            Request::Restore {
                folder: "docs".into(),
                path: Some("a.txt".into()),
                version: None,
                at: None,
                recursive: false
            }
        );
        let line = serde_json::to_string(&Request::Resolve {
            folder: "docs".into(),
            path: "a.txt".into(),
            keep: "local".into(),
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"cmd":"resolve","folder":"docs","path":"a.txt","keep":"local"}"#
        );
        let r: Request = serde_json::from_str(
            r#"{"cmd":"restore-remote","folder":"docs","path":"a.txt","device":"b","version":7}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::RestoreRemote {
                folder: "docs".into(),
                path: "a.txt".into(),
                device: "b".into(),
                version: 7,
                to: None,
                force: false
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"history","folder":"docs"}"#).unwrap();
        assert_eq!(
            r,
            Request::History {
                folder: "docs".into(),
                path: None
            }
        );
    }
}
