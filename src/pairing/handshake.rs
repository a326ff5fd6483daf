//! The pairing handshake on [`PAIR_ALPN`](crate::protocol::PAIR_ALPN).
//!
//! The inviter is authenticated by TLS: the joiner dials the key the code names.
//! The joiner proves it holds the code's secret with a keyed blake3 MAC over
//! both device ids; the secret itself never crosses the link, and a captured
//! proof is useless to any other device (its TLS key differs) and to this one
//! once the single-use invite is spent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use iroh::endpoint::Connection;

use super::code::InviteCode;
use crate::device::DeviceId;
use crate::protocol::{
    FolderOffer, PROTOCOL_VERSION, PairMessage, PairRefusal, ProtocolError, read_msg, write_msg,
};

/// How long the handshake may take once connected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// The public handle of an invite: derived from its secret, reveals nothing of it.
pub fn invite_id(secret: &[u8; 16]) -> [u8; 16] {
    let key = blake3::derive_key("ferry 2026-11 pairing invite id", secret);
    let mut id = [0u8; 16];
    id.copy_from_slice(&key[..16]);
    id
}

/// The joiner's proof of holding `secret`, bound to both devices.
pub fn proof(secret: &[u8; 16], inviter: &DeviceId, joiner: &DeviceId) -> [u8; 32] {
    let key = blake3::derive_key("ferry 2026-11 pairing proof key", secret);
    let mut mac = blake3::Hasher::new_keyed(&key);
    mac.update(inviter.public_key().as_bytes());
    mac.update(joiner.public_key().as_bytes());
    *mac.finalize().as_bytes()
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The inviter refused, and said why.
    #[error("the inviting device refused: {0}")]
    Refused(PairRefusal),
    /// The code expired before it was used.
    #[error("this invite code expired {0} s ago; ask for a new one")]
    Expired(u64),
    /// The code names this very device.
    #[error("this invite code was made by this device; use it on the other one")]
    OwnCode,
    /// The link failed or the peer spoke nonsense.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The peer did not answer in time.
    #[error("the inviting device did not answer within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout,
    /// The peer answered with something out of place.
    #[error("the inviting device answered out of turn")]
    Unexpected,
}

/// What a successful join learned about the inviter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The inviter's name.
    pub name: String,
    /// The folder the invite shares.
    pub folder: Option<FolderOffer>,
}

struct Pending {
    secret: [u8; 16],
    expires_at: u64,
    folder: Option<FolderOffer>,
    used: bool,
}

/// The inviter's pending invites (kept in memory: an agent restart cancels them).
#[derive(Default)]
pub struct Invites {
    pending: Mutex<HashMap<[u8; 16], Pending>>,
}

/// A pairing the inviter accepted: the caller records it, then confirms.
pub struct Admission {
    invite_id: [u8; 16],
    /// The folder the invite shares.
    pub folder: Option<FolderOffer>,
}

impl Invites {
    /// Registers the invite behind `code`.
    pub fn add(&self, code: &InviteCode, folder: Option<FolderOffer>) {
        let mut p = self.pending.lock().expect("invites lock");
        p.retain(|_, i| i.expires_at > now());
        p.insert(
            invite_id(&code.secret),
            Pending {
                secret: code.secret,
                expires_at: code.expires_at,
                folder,
                used: false,
            },
        );
    }

    /// Checks a request and reserves the invite for it.
    pub fn admit(
        &self,
        id: &[u8; 16],
        proof_sent: &[u8; 32],
        inviter: &DeviceId,
        joiner: &DeviceId,
    ) -> Result<Admission, PairRefusal> {
        let mut p = self.pending.lock().expect("invites lock");
        let invite = p.get_mut(id).ok_or(PairRefusal::UnknownCode)?;
        // blake3::Hash equality is constant-time.
        let expected = blake3::Hash::from_bytes(proof(&invite.secret, inviter, joiner));
        if expected != blake3::Hash::from_bytes(*proof_sent) {
            return Err(PairRefusal::BadProof);
        }
        if invite.used {
            return Err(PairRefusal::AlreadyUsed);
        }
        if invite.expires_at <= now() {
            return Err(PairRefusal::Expired);
        }
        invite.used = true;
        Ok(Admission {
            invite_id: *id,
            folder: invite.folder.clone(),
        })
    }

    /// Gives a reserved invite back after the pairing could not be recorded.
    pub fn release(&self, a: &Admission) {
        if let Some(i) = self
            .pending
            .lock()
            .expect("invites lock")
            .get_mut(&a.invite_id)
        {
            i.used = false;
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Joiner side: proves the code on `conn` (already dialled to the inviter).
pub async fn join(
    conn: &Connection,
    code: &InviteCode,
    me: DeviceId,
    my_name: &str,
    my_addrs: Vec<SocketAddr>,
) -> Result<Joined, PairError> {
    let inviter = DeviceId::new(code.inviter);
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(io)?;
        write_msg(
            &mut send,
            &PairMessage::Request {
                version: PROTOCOL_VERSION,
                invite_id: invite_id(&code.secret),
                proof: proof(&code.secret, &inviter, &me),
                name: my_name.to_owned(),
                addrs: my_addrs,
            },
        )
        .await?;
        send.finish().map_err(io)?;
        match read_msg::<PairMessage>(&mut recv).await? {
            Some(PairMessage::Accepted { name, folder }) => Ok(Joined { name, folder }),
            Some(PairMessage::Refused { reason }) => Err(PairError::Refused(reason)),
            _ => Err(PairError::Unexpected),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .map_err(|_| PairError::Timeout)?
}

/// What the inviter learned from an accepted request.
pub struct Request {
    /// The joiner's device.
    pub joiner: DeviceId,
    /// Its name.
    pub name: String,
    /// Its direct addresses.
    pub addrs: Vec<SocketAddr>,
}

/// Inviter side: answers one pairing connection. `record` stores the pairing
/// and returns this device's name; if it fails, the invite stays usable.
pub async fn answer(
    conn: Connection,
    invites: &Invites,
    me: DeviceId,
    record: impl AsyncFnOnce(&Request, &Admission) -> Result<String, String>,
) -> Result<Request, PairError> {
    let joiner = DeviceId::new(conn.remote_id());
    let exchange = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(io)?;
        let Some(PairMessage::Request {
            version,
            invite_id,
            proof,
            name,
            addrs,
        }) = read_msg::<PairMessage>(&mut recv).await?
        else {
            return Err(PairError::Unexpected);
        };
        let refuse = |reason| PairMessage::Refused { reason };
        let request = Request {
            joiner,
            name,
            addrs,
        };
        let outcome = if version != PROTOCOL_VERSION {
            Err(PairRefusal::UnsupportedVersion)
        } else {
            invites.admit(&invite_id, &proof, &me, &joiner)
        };
        let reply = match &outcome {
            Err(reason) => refuse(*reason),
            Ok(admission) => match record(&request, admission).await {
                Ok(my_name) => PairMessage::Accepted {
                    name: my_name,
                    folder: admission.folder.clone(),
                },
                Err(e) => {
                    tracing::error!(device = %joiner, "could not record a pairing: {e}");
                    invites.release(admission);
                    refuse(PairRefusal::Internal)
                }
            },
        };
        write_msg(&mut send, &reply).await?;
        send.finish().map_err(io)?;
        // Let the reply reach the joiner before the connection is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        match reply {
            PairMessage::Refused { reason } => Err(PairError::Refused(reason)),
            _ => Ok(request),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .map_err(|_| PairError::Timeout)?
}

fn io(e: impl std::fmt::Display) -> PairError {
    PairError::Protocol(ProtocolError::Io(std::io::Error::other(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(n: u8) -> DeviceId {
        DeviceId::new(iroh::SecretKey::from_bytes(&[n; 32]).public())
    }

    fn code(secret: [u8; 16], expires_at: u64) -> InviteCode {
        InviteCode {
            inviter: device(1).public_key(),
            secret,
            expires_at,
            addrs: vec![],
            relay: None,
        }
    }

    #[test]
    fn a_proof_is_bound_to_the_secret_and_both_devices() {
        let (a, b, c) = (device(1), device(2), device(3));
        let p = proof(&[7; 16], &a, &b);
        assert_ne!(p, proof(&[8; 16], &a, &b));
        assert_ne!(p, proof(&[7; 16], &a, &c));
        assert_ne!(p, proof(&[7; 16], &c, &b));
        assert_ne!(invite_id(&[7; 16])[..], p[..16]);
    }

    #[test]
    fn invites_are_single_use_expire_and_check_the_proof() {
        let invites = Invites::default();
        let (me, joiner) = (device(1), device(2));
        let good = code([5; 16], now() + 60);
        invites.add(&good, None);
        let id = invite_id(&good.secret);

        let wrong = proof(&[6; 16], &me, &joiner);
        assert!(matches!(
            invites.admit(&id, &wrong, &me, &joiner),
            Err(PairRefusal::BadProof)
        ));
        let right = proof(&good.secret, &me, &joiner);
        let a = invites.admit(&id, &right, &me, &joiner).unwrap();
        assert!(matches!(
            invites.admit(&id, &right, &me, &joiner),
            Err(PairRefusal::AlreadyUsed)
        ));
        invites.release(&a);
        assert!(invites.admit(&id, &right, &me, &joiner).is_ok());

        assert!(matches!(
            invites.admit(&invite_id(&[9; 16]), &right, &me, &joiner),
            Err(PairRefusal::UnknownCode)
        ));

        let old = code([4; 16], now() + 1);
        invites.add(&old, None);
        let p = invites
            .pending
            .lock()
            .unwrap()
            .get_mut(&invite_id(&old.secret))
            .map(|i| {
                i.expires_at = now() - 1;
            });
        assert!(p.is_some());
        assert!(matches!(
            invites.admit(
                &invite_id(&old.secret),
                &proof(&old.secret, &me, &joiner),
                &me,
                &joiner
            ),
            Err(PairRefusal::Expired)
        ));
    }
}
