//! The gRPC codec of the generated server and client: prost's, with a
//! small first encode buffer.
//!
//! tonic gives every call its own encode buffer, allocated when the call
//! starts at the codec's buffer size (8 KiB by default) and kept while the
//! call lasts. A `WatchOnline` stream lasts for hours, so ten thousand
//! watchers held 80 MB of buffers that were empty between flushes. Answers
//! are small, and the buffer grows to fit a larger one, so it starts at
//! [`FIRST_ENCODE_BUFFER`]. Requests are decoded as prost's codec does.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The encode buffer a call starts with; most answers fit.
pub const FIRST_ENCODE_BUFFER: usize = 512;

/// tonic's own: an encoded stream is handed on once this much is buffered.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `ProstCodec` with a [`FIRST_ENCODE_BUFFER`] encode buffer. The
/// generated code makes one per call with `LeanCodec::default()`
/// (`codec_path` in `build.rs`).
#[derive(Debug)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(FIRST_ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
    }
}
