//! `ListOnlineResponse` encoded once and sent to every caller that shared
//! its read.
//!
//! A "who's online" box asks for the same first page on every page view,
//! so callers asking at once share one read ([`crate::shared_reads`]). Tonic
//! takes an owned message per call and encodes it per call, so each of
//! them cloned the page (a hundred names, each its own allocation) and
//! encoded it again: most of what a page costs the service beyond a
//! `Health/Check`. The server ([`crate::proto::server`]) sends this type in
//! place of `ListOnlineResponse`: the same bytes on the wire, encoded once
//! per read, and a clone shares them.

use std::fmt;

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType},
};

use crate::proto::v1::ListOnlineResponse;

/// A `ListOnlineResponse`, encoded.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct EncodedListOnline {
    bytes: Bytes,
}

impl EncodedListOnline {
    pub fn new(response: &ListOnlineResponse) -> Self {
        Self {
            bytes: response.encode_to_vec().into(),
        }
    }

    /// The response, decoded again.
    pub fn decode(&self) -> Result<ListOnlineResponse, DecodeError> {
        ListOnlineResponse::decode(self.bytes.clone())
    }
}

impl fmt::Debug for EncodedListOnline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.decode() {
            Ok(response) => response.fmt(f),
            Err(_) => write!(f, "EncodedListOnline({} bytes, not decodable)", self.bytes.len()),
        }
    }
}

impl Message for EncodedListOnline {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes);
    }

    /// Decoding is never on the server's path (it only sends these); it is
    /// done right all the same, through `ListOnlineResponse`.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut response = self.decode()?;
        response.merge_field(tag, wire_type, buf, ctx)?;
        *self = Self::new(&response);
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

    fn response() -> ListOnlineResponse {
        ListOnlineResponse {
            users: vec!["ada".to_owned(), "bob".to_owned()],
            guests: vec!["10.0.0.1".to_owned()],
            user_count: 2,
            guest_count: 1,
            next_page_token: "token".to_owned(),
        }
    }

    /// What clients decode is exactly what the plain message would have
    /// been.
    #[test]
    fn it_is_byte_for_byte_the_plain_response() {
        let encoded = EncodedListOnline::new(&response());
        assert_eq!(encoded.encode_to_vec(), response().encode_to_vec());
        assert_eq!(encoded.encoded_len(), response().encoded_len());
        let decoded = ListOnlineResponse::decode(encoded.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded, response());
    }

    #[test]
    fn it_decodes_as_well_as_it_encodes() {
        let decoded =
            EncodedListOnline::decode_length_delimited(response().encode_length_delimited_to_vec().as_slice())
                .expect("decodes");
        assert_eq!(decoded.decode().expect("decodes"), response());
        let mut cleared = decoded;
        cleared.clear();
        assert_eq!(cleared.decode().expect("decodes"), ListOnlineResponse::default());
    }
}
