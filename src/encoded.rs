//! `OnlineChanges` encoded once and sent to many watchers.
//!
//! A flush of changes goes to every watcher of a scope. Tonic takes an owned
//! message per stream item and encodes it per stream, so with 10,000
//! watchers the same message was cloned (thousands of names, each its own
//! allocation) and encoded 10,000 times: most of the fan-out's CPU, and
//! reports through the replica waited behind it. The server's
//! `WatchOnlineResponse` ([`crate::proto::server`]) carries this type in
//! place of `OnlineChanges`: the same bytes on the wire (field 2 of the
//! response, length-delimited), encoded once per flush, and a clone shares
//! them.

use std::fmt;

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType},
};

use crate::proto::v1::OnlineChanges;

/// An `OnlineChanges`, encoded.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct EncodedChanges {
    bytes: Bytes,
}

impl EncodedChanges {
    pub fn new(changes: &OnlineChanges) -> Self {
        Self {
            bytes: changes.encode_to_vec().into(),
        }
    }

    /// The changes, decoded again.
    pub fn decode(&self) -> Result<OnlineChanges, DecodeError> {
        OnlineChanges::decode(self.bytes.clone())
    }
}

impl fmt::Debug for EncodedChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.decode() {
            Ok(changes) => changes.fmt(f),
            Err(_) => write!(f, "EncodedChanges({} bytes, not decodable)", self.bytes.len()),
        }
    }
}

impl Message for EncodedChanges {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes);
    }

    /// Decoding is never on the server's path (it only sends these); it is
    /// done right all the same, through `OnlineChanges`.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut changes = self.decode()?;
        changes.merge_field(tag, wire_type, buf, ctx)?;
        *self = Self::new(&changes);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    fn clear(&mut self) {
        self.bytes = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{server, v1};

    fn changes() -> OnlineChanges {
        OnlineChanges {
            joined_users: vec!["ada".to_owned(), "bob".to_owned()],
            left_users: vec!["cy".to_owned()],
            joined_guests: vec!["10.0.0.1".to_owned()],
            left_guests: Vec::new(),
            user_count: 2,
            guest_count: 1,
        }
    }

    /// What clients decode is exactly what the plain message would have
    /// been: the server's response and `v1`'s encode to the same bytes.
    #[test]
    fn the_servers_response_is_byte_for_byte_the_plain_one() {
        let plain = v1::WatchOnlineResponse {
            event: Some(v1::watch_online_response::Event::Changes(changes())),
        };
        let shared = server::WatchOnlineResponse {
            event: Some(server::watch_online_response::Event::Changes(EncodedChanges::new(
                &changes(),
            ))),
        };
        assert_eq!(shared.encode_to_vec(), plain.encode_to_vec());
        let decoded = v1::WatchOnlineResponse::decode(shared.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded, plain);
    }

    #[test]
    fn it_decodes_as_well_as_it_encodes() {
        let plain = v1::WatchOnlineResponse {
            event: Some(v1::watch_online_response::Event::Changes(changes())),
        };
        let decoded = server::WatchOnlineResponse::decode(plain.encode_to_vec().as_slice()).expect("decodes");
        match decoded.event {
            Some(server::watch_online_response::Event::Changes(encoded)) => {
                assert_eq!(encoded.decode().expect("decodes"), changes());
            }
            other => panic!("not changes: {other:?}"),
        }
    }
}
