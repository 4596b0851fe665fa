//! The protobuf codec of every generated service, with small buffers.
//!
//! tonic's default codec starts each message buffer at 8 KiB, once for
//! encoding and once for decoding per stream. A host's stream lives for hours
//! and carries heartbeats of a few bytes, so with 15,000 hosts those buffers
//! were a third of the server's memory. Buffers start at `BUFFER_SIZE` here and
//! grow as a message needs (prost reserves what it encodes), so large messages
//! still work.

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers.
const BUFFER_SIZE: usize = 512;
/// tonic's default: how much is buffered before an encoder yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `ProstCodec` with small buffers (see the module's notes).
#[derive(Debug, Clone)]
pub struct CompactCodec<T, U> {
    _messages: std::marker::PhantomData<(T, U)>,
}

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        CompactCodec { _messages: std::marker::PhantomData }
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
