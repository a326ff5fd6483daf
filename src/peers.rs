//! Keeps a link up to every paired device: dials with backoff, accepts incoming
//! links, keeps one link per device, exchanges hellos, and reports link state.
//!
//! When both devices dial at once, both keep the link the smaller id dialled;
//! otherwise the newest link wins (the peer restarted and the old link has not
//! timed out yet). The device with the larger id waits a moment before
//! dialling, so that crossing links are rare.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iroh::Endpoint;
use iroh::endpoint::{Connection, SendStream};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::device::DeviceId;
use crate::index::{SharedIndex, now_secs};
use crate::protocol::{
    FolderOffer, IndexState, PROTOCOL_VERSION, SYNC_ALPN, SyncMessage, read_msg, write_msg,
};
use crate::sync::Engine;
use crate::sync::wire::{offer_from_wire, offer_to_wire};
use crate::transport::{
    self, AllowList, CLOSE_DUPLICATE, CLOSE_REMOVED, CLOSE_SHUTDOWN, CLOSE_UNKNOWN_DEVICE,
    selected_path,
};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long the device with the larger id waits before dialling.
const YIELD_DELAY: Duration = Duration::from_millis(1500);
/// Two links of opposite direction that come up within this time of each other
/// were dialled at the same moment: both sides keep the one dialled by the
/// smaller id. Outside it the newest link wins (the peer restarted).
const RACE_WINDOW: Duration = Duration::from_secs(3);

/// Who dials first when a device is (newly) watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstDial {
    /// The device with the smaller id dials at once, the other waits a moment.
    ById,
    /// Dial at once (the joiner, right after pairing: it just reached the peer).
    Now,
    /// Wait a moment for the peer to dial (the inviter, right after pairing).
    Later,
}

struct Link {
    conn: Connection,
    outgoing: bool,
    since: i64,
    up_at: std::time::Instant,
    control: Option<Arc<tokio::sync::Mutex<SendStream>>>,
}

struct PeerTask {
    stop: CancellationToken,
    kick: Arc<Notify>,
}

/// The state of one paired device, as `ferry devices` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    /// Device id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Whether a link is up.
    pub connected: bool,
    /// The peer's address on the link.
    pub address: Option<String>,
    /// Direct (true) or through a relay (false), when connected.
    pub direct: Option<bool>,
    /// Since when connected (Unix seconds).
    pub connected_since: Option<i64>,
    /// Last time it was connected (Unix seconds).
    pub last_seen_at: Option<i64>,
    /// Bytes received on the current link.
    pub bytes_in: u64,
    /// Bytes sent on the current link.
    pub bytes_out: u64,
    /// Why the last attempt to link failed, while not connected.
    pub last_error: Option<String>,
    /// Chunk bytes received from it and verified (since the agent started).
    pub chunk_bytes_in: u64,
    /// Chunk bytes served to it (since the agent started).
    pub chunk_bytes_out: u64,
    /// Chunks it sent that failed their hash check.
    pub bad_chunks: u64,
    /// Records it sent that were refused (unsafe paths, malformed fields).
    pub bad_records: u64,
    /// Requests it sent that were refused (over the size limit, malformed).
    pub bad_requests: u64,
    /// Requests to it that it left unanswered past the request timeout.
    pub stalled_requests: u64,
}

/// The link manager.
pub struct Peers {
    ep: Endpoint,
    allow: AllowList,
    index: SharedIndex,
    me: DeviceId,
    my_name: String,
    links: Mutex<HashMap<DeviceId, Link>>,
    tasks: Mutex<HashMap<DeviceId, PeerTask>>,
    /// The last reason a link to a device failed, cleared when a link comes up.
    errors: Mutex<HashMap<DeviceId, String>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    engine: Arc<Engine>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Peers {
    /// A manager for `ep`'s links; call [`Peers::start`] to begin dialling.
    pub fn new(
        ep: Endpoint,
        allow: AllowList,
        index: SharedIndex,
        my_name: String,
        shutdown: CancellationToken,
        engine: Arc<Engine>,
    ) -> Arc<Self> {
        let me = DeviceId::new(ep.id());
        Arc::new(Self {
            ep,
            allow,
            index,
            me,
            my_name,
            links: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            errors: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            shutdown,
            engine,
        })
    }

    /// Loads the paired devices, allows them, and starts keeping links to them.
    pub async fn start(self: &Arc<Self>) -> Result<(), crate::index::IndexError> {
        let peers = self.index.run(|i| i.peers()).await?;
        self.allow.set(peers.iter().map(|p| p.id));
        for p in peers {
            self.watch(p.id, FirstDial::ById);
        }
        Ok(())
    }

    /// Starts keeping a link to a (newly) paired device.
    pub fn watch(self: &Arc<Self>, peer: DeviceId, first: FirstDial) {
        self.allow.insert(peer);
        let mut tasks = self.tasks.lock().expect("tasks lock");
        if let Some(t) = tasks.get(&peer) {
            t.kick.notify_one();
            return;
        }
        let task = PeerTask {
            stop: self.shutdown.child_token(),
            kick: Arc::new(Notify::new()),
        };
        let (stop, kick) = (task.stop.clone(), task.kick.clone());
        tasks.insert(peer, task);
        let this = self.clone();
        self.tracker
            .spawn(async move { this.maintain(peer, first, stop, kick).await });
    }

    /// Stops talking to a device that was removed, closing its link.
    pub fn forget(&self, peer: &DeviceId) {
        self.allow.remove(peer);
        if let Some(t) = self.tasks.lock().expect("tasks lock").remove(peer) {
            t.stop.cancel();
        }
        if let Some(l) = self.links.lock().expect("links lock").remove(peer) {
            l.conn.close(CLOSE_REMOVED.into(), b"device removed");
        }
    }

    /// Closes every link and waits for the link tasks to end.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        for (_, l) in self.links.lock().expect("links lock").drain() {
            l.conn.close(CLOSE_SHUTDOWN.into(), b"agent shutting down");
        }
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Handles an incoming sync link (the endpoint hook already checked the peer).
    pub async fn accept(self: &Arc<Self>, conn: Connection) {
        self.clone().run_link(conn, false, None).await;
    }

    /// The status of every paired device.
    pub async fn status(&self) -> Result<Vec<DeviceStatus>, crate::index::IndexError> {
        use std::sync::atomic::Ordering::Relaxed;
        let peers = self.index.run(|i| i.peers()).await?;
        let links = self.links.lock().expect("links lock");
        let errors = self.errors.lock().expect("errors lock");
        Ok(peers
            .into_iter()
            .map(|p| {
                // A link counts once its hello is through (a refused one never is).
                let link = links
                    .get(&p.id)
                    .filter(|l| l.control.is_some() && l.conn.close_reason().is_none());
                let path = link.and_then(|l| selected_path(&l.conn));
                let stats = link.map(|l| l.conn.stats());
                let c = self.engine.counters(&p.id);
                DeviceStatus {
                    id: p.id.to_string(),
                    name: p.name,
                    connected: link.is_some(),
                    address: path.as_ref().map(|p| p.remote.clone()),
                    direct: path.as_ref().map(|p| p.direct),
                    connected_since: link.map(|l| l.since),
                    last_seen_at: if link.is_some() {
                        Some(now_secs())
                    } else {
                        p.last_seen_at
                    },
                    bytes_in: stats.as_ref().map_or(0, |s| s.udp_rx.bytes),
                    bytes_out: stats.as_ref().map_or(0, |s| s.udp_tx.bytes),
                    last_error: if link.is_some() {
                        None
                    } else {
                        errors.get(&p.id).cloned()
                    },
                    chunk_bytes_in: c.chunk_bytes_in.load(Relaxed),
                    chunk_bytes_out: c.chunk_bytes_out.load(Relaxed),
                    bad_chunks: c.bad_chunks.load(Relaxed),
                    bad_records: c.bad_records.load(Relaxed),
                    bad_requests: c.bad_requests.load(Relaxed),
                    stalled_requests: c.stalled_requests.load(Relaxed),
                }
            })
            .collect())
    }

    /// Tells a connected peer which folders are now shared with it.
    pub async fn announce_folders(&self, peer: &DeviceId) {
        let control = self
            .links
            .lock()
            .expect("links lock")
            .get(peer)
            .and_then(|l| l.control.clone());
        let Some(control) = control else { return };
        let peer_id = *peer;
        let folders = match self.index.run(move |i| i.offers_to(&peer_id)).await {
            Ok(f) => offers(f),
            Err(e) => {
                tracing::warn!("cannot list shared folders: {e}");
                return;
            }
        };
        let mut send = control.lock().await;
        if let Err(e) = write_msg(&mut *send, &SyncMessage::Folders { folders }).await {
            tracing::debug!(device = %peer, "could not announce folders: {e}");
        }
    }

    fn current(&self, peer: &DeviceId) -> Option<Connection> {
        self.links
            .lock()
            .expect("links lock")
            .get(peer)
            .filter(|l| l.control.is_some() && l.conn.close_reason().is_none())
            .map(|l| l.conn.clone())
    }

    async fn maintain(
        self: Arc<Self>,
        peer: DeviceId,
        first: FirstDial,
        stop: CancellationToken,
        kick: Arc<Notify>,
    ) {
        let mut backoff = Duration::from_secs(1);
        let mut first = Some(first);
        loop {
            if let Some(conn) = self.current(&peer) {
                tokio::select! {
                    _ = conn.closed() => {}
                    _ = stop.cancelled() => return,
                }
                backoff = Duration::from_secs(1);
            }
            let wait = match first.take().unwrap_or(FirstDial::ById) {
                FirstDial::ById => self.me > peer,
                FirstDial::Now => false,
                FirstDial::Later => true,
            };
            if wait {
                tokio::select! {
                    _ = tokio::time::sleep(YIELD_DELAY) => {}
                    _ = stop.cancelled() => return,
                }
                if self.current(&peer).is_some() {
                    continue;
                }
            }
            let addrs: Vec<SocketAddr> = self
                .index
                .run(move |i| i.peer(&peer))
                .await
                .ok()
                .flatten()
                .map(|p| p.addresses)
                .unwrap_or_default();
            let dialled = tokio::select! {
                r = transport::dial(&self.ep, peer, &addrs, SYNC_ALPN) => r,
                _ = stop.cancelled() => return,
            };
            match dialled {
                Ok(conn) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let this = self.clone();
                    let c = conn.clone();
                    self.tracker
                        .spawn(async move { this.run_link(c, true, Some(tx)).await });
                    let hello = tokio::time::timeout(HELLO_TIMEOUT * 2, rx).await;
                    if matches!(hello, Ok(Ok(Ok(())))) || self.current(&peer).is_some() {
                        backoff = Duration::from_secs(1);
                        continue;
                    }
                    // The device took the connection but not the link: it does
                    // not know us (any more). Ask again only rarely.
                    let refused = matches!(
                        conn.close_reason(),
                        Some(iroh::endpoint::ConnectionError::ApplicationClosed(ref c))
                            if c.error_code == CLOSE_UNKNOWN_DEVICE.into()
                                || c.error_code == CLOSE_REMOVED.into()
                    );
                    if refused {
                        backoff = MAX_BACKOFF;
                    }
                    tracing::debug!(device = %peer, refused, "link failed; retrying in {backoff:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = kick.notified() => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    tracing::debug!(device = %peer, "dial failed: {e}; retrying in {backoff:?}");
                    self.set_error(peer, e.to_string());
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = kick.notified() => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Registers a link (newest wins), exchanges hellos, then serves the control
    /// stream until the link ends.
    async fn run_link(
        self: Arc<Self>,
        conn: Connection,
        outgoing: bool,
        hello_done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) {
        let peer = DeviceId::new(conn.remote_id());
        let mut hello_done = hello_done;
        let mut report = |r: Result<(), String>| {
            if let Some(tx) = hello_done.take() {
                let _ = tx.send(r);
            }
        };
        if !self.allow.contains(&peer) {
            conn.close(CLOSE_REMOVED.into(), b"unknown device");
            report(Err("device removed".into()));
            return;
        }
        {
            let mut links = self.links.lock().expect("links lock");
            if let Some(old) = links.get(&peer)
                && old.conn.close_reason().is_none()
                && old.outgoing != outgoing
                && old.up_at.elapsed() < RACE_WINDOW
                && outgoing != (self.me < peer)
            {
                // Both dialled at once: keep the link the smaller id dialled,
                // as the peer does.
                tracing::debug!(device = %peer, "dropping a link dialled at the same time as another");
                conn.close(CLOSE_DUPLICATE.into(), b"crossed with another link");
                report(Err("crossed with another link".into()));
                return;
            }
            if let Some(old) = links.insert(
                peer,
                Link {
                    conn: conn.clone(),
                    outgoing,
                    since: now_secs(),
                    up_at: std::time::Instant::now(),
                    control: None,
                },
            ) && old.conn.stable_id() != conn.stable_id()
            {
                tracing::debug!(device = %peer, old_outgoing = old.outgoing, "replacing a link");
                old.conn
                    .close(CLOSE_DUPLICATE.into(), b"replaced by a newer link");
            }
        }
        match tokio::time::timeout(HELLO_TIMEOUT, self.hello(&conn, peer, outgoing)).await {
            Ok(Ok((send, mut recv, name, folders, index))) => {
                if let Some(l) = self.links.lock().expect("links lock").get_mut(&peer)
                    && l.conn.stable_id() == conn.stable_id()
                {
                    l.control = Some(Arc::new(tokio::sync::Mutex::new(send)));
                }
                tracing::info!(device = %peer, %name, outgoing, "link up");
                report(Ok(()));
                self.errors.lock().expect("errors lock").remove(&peer);
                let addr = selected_path(&conn).and_then(|p| p.ip);
                take_offers(&self.engine, &self.index, peer, folders).await;
                let sync = tokio::spawn(crate::sync::link::run(
                    self.engine.clone(),
                    conn.clone(),
                    peer,
                    index,
                ));
                let seen = self.index.run(move |i| i.peer_seen(&peer, addr)).await;
                if let Err(e) = seen {
                    tracing::warn!(device = %peer, "cannot record the link: {e}");
                }
                loop {
                    tokio::select! {
                        msg = read_msg::<SyncMessage>(&mut recv) => match msg {
                            Ok(Some(SyncMessage::Folders { folders })) => {
                                take_offers(&self.engine, &self.index, peer, folders).await;
                            }
                            Ok(Some(SyncMessage::Hello { .. })) => {
                                tracing::warn!(device = %peer, "second hello on a link; closing it");
                                break;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(device = %peer, "link error: {e}");
                                break;
                            }
                        },
                        _ = conn.closed() => break,
                    }
                }
                sync.abort();
            }
            Ok(Err(e)) => {
                // The peer's reason for closing says more than "connection lost".
                let e = match conn.close_reason() {
                    Some(reason) => format!("the device closed the link: {reason}"),
                    None => e,
                };
                tracing::debug!(device = %peer, "hello failed: {e}");
                self.set_error(peer, e.clone());
                report(Err(e));
            }
            Err(_) => {
                tracing::debug!(device = %peer, "no hello in time");
                self.set_error(peer, "the device did not answer in time".into());
                report(Err("no hello in time".into()));
            }
        }
        let mut links = self.links.lock().expect("links lock");
        if links
            .get(&peer)
            .is_some_and(|l| l.conn.stable_id() == conn.stable_id())
        {
            links.remove(&peer);
            tracing::info!(device = %peer, "link down");
        }
    }

    fn set_error(&self, peer: DeviceId, e: String) {
        self.errors.lock().expect("errors lock").insert(peer, e);
    }

    async fn hello(
        &self,
        conn: &Connection,
        peer: DeviceId,
        outgoing: bool,
    ) -> Result<
        (
            SendStream,
            iroh::endpoint::RecvStream,
            String,
            Vec<FolderOffer>,
            Vec<IndexState>,
        ),
        String,
    > {
        let folders = self
            .index
            .run(move |i| i.offers_to(&peer))
            .await
            .map_err(|e| e.to_string())?;
        let mine = SyncMessage::Hello {
            version: PROTOCOL_VERSION,
            name: self.my_name.clone(),
            folders: offers(folders),
            index: self.engine.index_states(peer).await,
        };
        let (mut send, mut recv) = if outgoing {
            let (mut s, r) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_msg(&mut s, &mine).await.map_err(|e| e.to_string())?;
            (s, r)
        } else {
            conn.accept_bi().await.map_err(|e| e.to_string())?
        };
        let theirs = read_msg::<SyncMessage>(&mut recv)
            .await
            .map_err(|e| e.to_string())?;
        let Some(SyncMessage::Hello {
            version,
            name,
            folders,
            index,
        }) = theirs
        else {
            return Err("expected a hello".into());
        };
        if version != PROTOCOL_VERSION {
            return Err(format!("peer speaks protocol revision {version}"));
        }
        if !outgoing {
            write_msg(&mut send, &mine)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok((send, recv, name, folders, index))
    }
}

fn offers(folders: Vec<crate::index::Offered>) -> Vec<FolderOffer> {
    folders.into_iter().map(offer_to_wire).collect()
}

/// Takes in the folders a peer lists: the plain ones are synced with it, the
/// encrypted ones are held by it (or offered to this device to hold); the
/// offers of folders this device lacks are recorded.
async fn take_offers(
    engine: &Arc<crate::sync::Engine>,
    index: &SharedIndex,
    peer: DeviceId,
    folders: Vec<FolderOffer>,
) {
    let (sealed, plain): (Vec<FolderOffer>, Vec<FolderOffer>) =
        folders.into_iter().partition(|f| f.encrypted);
    engine.set_peer_folders(peer, plain.iter().map(|f| f.id.clone()));
    engine.set_peer_vaults(peer, sealed.iter().map(|f| f.id.clone()));
    let offered: Vec<crate::index::Offered> = plain
        .into_iter()
        .chain(sealed)
        .map(offer_from_wire)
        .collect();
    let r = index
        .run(move |i| -> Result<(), crate::index::IndexError> {
            for o in &offered {
                if let Some(secret) = &o.secret
                    && i.reconcile_secret(&o.id, secret)?
                {
                    tracing::info!(device = %peer, folder = %o.id, "took the folder's key from a device that has it");
                }
            }
            i.record_offers(&peer, &offered)?;
            Ok(())
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(device = %peer, "cannot record offers: {e}");
    }
}
