//! The iroh endpoint: how it is built from the device key and the network
//! config, which ALPNs it speaks, and who may open a sync link (paired devices
//! only; everyone else is refused right after the TLS handshake, and counted).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use iroh::endpoint::{
    AfterHandshakeOutcome, Connection, EndpointHooks, QuicTransportConfig, presets,
};
use iroh::{Endpoint, EndpointAddr, RelayMode, RelayUrl, SecretKey};

use crate::config::NetworkConfig;
use crate::device::DeviceId;
use crate::protocol::{PAIR_ALPN, SYNC_ALPN};

/// QUIC close code for a refused device.
pub const CLOSE_UNKNOWN_DEVICE: u32 = 1;
/// QUIC close code for a duplicate link (the other one is kept).
pub const CLOSE_DUPLICATE: u32 = 2;
/// QUIC close code for the agent shutting down.
pub const CLOSE_SHUTDOWN: u32 = 3;
/// QUIC close code for a device that was just removed.
pub const CLOSE_REMOVED: u32 = 4;

/// How long a dial may take before it is given up (iroh's own limit is ~30 s).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes a peer may have sent on one connection that this device has
/// not read yet, over all its streams. QUIC's default has no such cap, so a
/// peer could park 1.25 MB in each of hundreds of streams it opens.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Most request streams a peer may have open at once (QUIC's default): also
/// how many of its requests this device serves at a time.
pub const MAX_REQUEST_STREAMS: u32 = 100;
/// Most uni-streams a peer may have open at once: a link uses one each way
/// (the index stream); a little slack for a reconnect's overlap.
pub const MAX_UNI_STREAMS: u32 = 4;

/// Why the endpoint could not be set up or a peer reached.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// `network.listen` or `network.relays` is not usable.
    #[error("invalid network setting: {0}")]
    Config(String),
    /// Binding the UDP socket failed (port in use?).
    #[error("cannot listen on {addr}: {message}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// Dialling failed.
    #[error("cannot reach device {device}: {message}")]
    Dial {
        /// The device.
        device: DeviceId,
        /// What failed.
        message: String,
    },
}

/// The devices allowed to open sync links, shared with the endpoint's hook.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    inner: Arc<AllowInner>,
}

#[derive(Debug, Default)]
struct AllowInner {
    devices: RwLock<HashSet<DeviceId>>,
    refused: AtomicU64,
}

impl AllowList {
    /// Replaces the allowed set.
    pub fn set(&self, devices: impl IntoIterator<Item = DeviceId>) {
        *self.inner.devices.write().expect("allow-list lock") = devices.into_iter().collect();
    }

    /// Allows one more device.
    pub fn insert(&self, d: DeviceId) {
        self.inner
            .devices
            .write()
            .expect("allow-list lock")
            .insert(d);
    }

    /// Stops allowing a device.
    pub fn remove(&self, d: &DeviceId) {
        self.inner
            .devices
            .write()
            .expect("allow-list lock")
            .remove(d);
    }

    /// Whether a device may open a sync link.
    pub fn contains(&self, d: &DeviceId) -> bool {
        self.inner
            .devices
            .read()
            .expect("allow-list lock")
            .contains(d)
    }

    /// How many sync links from unknown devices were refused.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }
}

impl EndpointHooks for AllowList {
    async fn after_handshake<'a>(&'a self, conn: &'a Connection) -> AfterHandshakeOutcome {
        // Pairing is open to anyone holding a code; the handshake checks the code.
        if conn.alpn() != SYNC_ALPN {
            return AfterHandshakeOutcome::accept();
        }
        let remote = DeviceId::new(conn.remote_id());
        if self.contains(&remote) {
            return AfterHandshakeOutcome::accept();
        }
        let n = self.inner.refused.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(device = %remote, refused_total = n, "refused a link from an unknown device");
        AfterHandshakeOutcome::Reject {
            error_code: CLOSE_UNKNOWN_DEVICE.into(),
            reason: b"unknown device: pair with `ferry invite` / `ferry join` first".to_vec(),
        }
    }
}

/// Builds and binds the endpoint for this device.
pub async fn bind(
    secret: SecretKey,
    net: &NetworkConfig,
    listen: SocketAddr,
    allow: AllowList,
) -> Result<Endpoint, TransportError> {
    let relay_mode =
        match net.relays.as_str() {
            "disabled" => RelayMode::Disabled,
            "default" => RelayMode::Default,
            url => RelayMode::custom([RelayUrl::from_str(url)
                .map_err(|e| TransportError::Config(format!("{url}: {e}")))?]),
        };
    let mut builder = if net.discovery {
        Endpoint::builder(presets::N0)
    } else {
        Endpoint::builder(presets::Minimal)
    };
    let quic = QuicTransportConfig::builder()
        .receive_window(CONNECTION_WINDOW.into())
        .max_concurrent_bidi_streams(MAX_REQUEST_STREAMS.into())
        .max_concurrent_uni_streams(MAX_UNI_STREAMS.into())
        // Replies go out whole, oldest first, rather than interleaved packet
        // by packet: with a dozen chunk requests in flight, round-robin made
        // them all finish together at the end, leaving the receiver idle and
        // then swamped. Every stream's writes are bounded (a chunk, a put
        // of 2 MiB, an index batch), so none can hold the link for long.
        .send_fairness(false)
        .build();
    builder = builder
        .transport_config(quic)
        .secret_key(secret)
        .alpns(vec![SYNC_ALPN.to_vec(), PAIR_ALPN.to_vec()])
        .relay_mode(relay_mode)
        .hooks(allow)
        .clear_ip_transports()
        .bind_addr(listen)
        .map_err(|e| TransportError::Config(format!("{listen}: {e}")))?;
    if !net.port_mapping {
        builder = builder.portmapper_config(iroh::endpoint::PortmapperConfig::Disabled);
    }
    if net.local_discovery {
        builder = builder.address_lookup(iroh_mdns_address_lookup::MdnsAddressLookup::builder());
    }
    builder.bind().await.map_err(|e| TransportError::Bind {
        addr: listen,
        message: e.to_string(),
    })
}

/// Dials `device` at `addrs` (and wherever discovery finds it) on `alpn`.
pub async fn dial(
    ep: &Endpoint,
    device: DeviceId,
    addrs: &[SocketAddr],
    alpn: &[u8],
) -> Result<Connection, TransportError> {
    let mut addr = EndpointAddr::new(device.public_key());
    for a in addrs {
        addr = addr.with_ip_addr(*a);
    }
    match tokio::time::timeout(DIAL_TIMEOUT, ep.connect(addr, alpn)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(TransportError::Dial {
            device,
            message: e.to_string(),
        }),
        Err(_) => Err(TransportError::Dial {
            device,
            message: format!("no answer within {} s", DIAL_TIMEOUT.as_secs()),
        }),
    }
}

/// The path a link currently uses: the peer's address and whether it is direct
/// (UDP to the peer) rather than through a relay.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PathInfo {
    /// The peer's address (an IP address and port, or a relay URL).
    pub remote: String,
    /// Direct rather than relayed.
    pub direct: bool,
    /// The peer's IP address when direct.
    #[serde(skip)]
    pub ip: Option<SocketAddr>,
}

/// The selected path of a link, if any.
pub fn selected_path(conn: &Connection) -> Option<PathInfo> {
    let paths = conn.paths();
    let p = paths.iter().find(|p| p.is_selected())?;
    let remote = p.remote_addr();
    let ip = match remote {
        iroh::TransportAddr::Ip(a) => Some(*a),
        _ => None,
    };
    Some(PathInfo {
        remote: ip.map_or_else(|| format!("{remote:?}"), |a| a.to_string()),
        direct: p.is_ip(),
        ip,
    })
}

/// This endpoint's direct addresses, for invite codes and pairing.
pub fn direct_addrs(ep: &Endpoint) -> Vec<SocketAddr> {
    ep.addr().ip_addrs().copied().collect()
}

/// The relay this endpoint is reachable through, if any.
pub fn relay_url(ep: &Endpoint) -> Option<String> {
    ep.addr().relay_urls().next().map(|u| u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two offline endpoints on loopback that allow each other.
    async fn pair() -> (Endpoint, Endpoint) {
        let mut net = NetworkConfig::default().offline();
        net.local_discovery = false;
        let (ka, kb) = (SecretKey::generate(), SecretKey::generate());
        let (allow_a, allow_b) = (AllowList::default(), AllowList::default());
        allow_a.insert(DeviceId::new(kb.public()));
        allow_b.insert(DeviceId::new(ka.public()));
        let lo = SocketAddr::from(([127, 0, 0, 1], 0));
        let a = bind(ka, &net, lo, allow_a).await.expect("bind A");
        let b = bind(kb, &net, lo, allow_b).await.expect("bind B");
        (a, b)
    }

    /// A receiver busy with a fast stream of datagrams still gets its own
    /// packets out. Its QUIC driver spends tokio's cooperative budget on
    /// receiving, and netwatch (iroh's UDP socket) used to answer `Pending`
    /// to a send once the budget was spent; iroh drops a transmit that gets
    /// `Pending`, so the receiver's flow-control updates and requests were
    /// lost on loopback (about 3,000 packets per GiB) and its congestion
    /// window stayed at two to four packets. See vendor/README.md.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_receiver_loses_none_of_its_packets_on_loopback() {
        const TOTAL: usize = 256 << 20;
        let (a, b) = pair().await;
        let (a_id, a_addrs) = (DeviceId::new(a.id()), direct_addrs(&a));
        let sender = tokio::spawn(async move {
            let incoming = a.accept().await.expect("an incoming link");
            let conn = incoming.await.expect("the link is set up");
            let mut send = conn.open_uni().await.expect("open a stream");
            let block = vec![7u8; 1 << 20];
            for _ in 0..TOTAL / block.len() {
                send.write_all(&block).await.expect("write");
            }
            send.finish().expect("finish");
            conn.closed().await;
        });
        let conn = dial(&b, a_id, &a_addrs, SYNC_ALPN).await.expect("dial");
        let mut recv = conn.accept_uni().await.expect("the stream");
        let mut got = 0;
        while let Some(c) = recv.read_chunk(1 << 20).await.expect("read") {
            got += c.len();
        }
        assert_eq!(got, TOTAL);
        let stats = conn.stats();
        conn.close(0u32.into(), b"done");
        sender.await.expect("sender");
        // Datagrams of at most 1,472 bytes: the driver was kept busy.
        assert!(stats.udp_rx.datagrams as usize > TOTAL / 1500);
        assert!(stats.sent_packets > 0);
        assert_eq!(
            stats.lost_packets, 0,
            "the receiver lost {} of its {} packets",
            stats.lost_packets, stats.sent_packets
        );
    }
}
