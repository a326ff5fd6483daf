//! Any bytes from a peer either fail to decode as a wire message or decode to a
//! message within its limits that survives encoding and decoding again; file records
//! that decode are then checked by the sync layer without panicking.
#![no_main]
use ferry::protocol::{IndexMessage, Reply, Request, SyncMessage, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode::<SyncMessage>(data) {
        assert_eq!(decode::<SyncMessage>(&encode(&m)[4..]).ok(), Some(m));
    }
    if let Ok(m) = decode::<Request>(data) {
        assert_eq!(decode::<Request>(&encode(&m)[4..]).ok(), Some(m));
    }
    if let Ok(m) = decode::<Reply>(data) {
        assert_eq!(decode::<Reply>(&encode(&m)[4..]).ok(), Some(m));
    }
    if let Ok(m) = decode::<IndexMessage>(data) {
        assert_eq!(decode::<IndexMessage>(&encode(&m)[4..]).ok(), Some(m.clone()));
        let IndexMessage::Update { files, .. } = m;
        for f in files {
            let _ = ferry::sync::wire::from_wire(f);
        }
    }
});
