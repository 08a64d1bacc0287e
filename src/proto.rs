//! The generated protocol: messages, enums, the `ai.AI` client and server.

#![allow(missing_docs, unreachable_pub, non_camel_case_types, clippy::all)]

tonic::include_proto!("ai");

/// The codec of the protocol's messages: prost, with 1 KiB starting buffers
/// per stream instead of tonic's 8 KiB for encoding and 8 KiB for decoding.
/// A server holding 10,000 calls that wait holds 10,000 streams; the
/// buffers of one that moves payload grow to its messages as before.
#[derive(Debug, Clone, Copy)]
pub struct WireCodec<T, U>(std::marker::PhantomData<fn() -> (T, U)>);

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// The starting size of a stream's encode and decode buffers.
const STREAM_BUFFER: usize = 1 << 10;
/// Bytes encoded before a stream yields to others (tonic's default).
const YIELD_THRESHOLD: usize = 32 << 10;

impl<T, U> tonic::codec::Codec for WireCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::new(STREAM_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::new(STREAM_BUFFER, YIELD_THRESHOLD))
    }
}

/// The encoded `FileDescriptorSet` of `proto/ai.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ai_descriptor");

impl From<crate::codec::Encoding> for Encoding {
    fn from(e: crate::codec::Encoding) -> Self {
        match e {
            crate::codec::Encoding::Identity => Self::Identity,
            crate::codec::Encoding::Zstd => Self::Zstd,
        }
    }
}

impl From<Encoding> for crate::codec::Encoding {
    fn from(e: Encoding) -> Self {
        match e {
            Encoding::Identity => Self::Identity,
            Encoding::Zstd => Self::Zstd,
        }
    }
}

impl Encoding {
    /// The codec encoding of a wire value (`Header.encoding`,
    /// `Result.encoding`); `None` for a value this build does not know.
    pub fn codec(value: i32) -> Option<crate::codec::Encoding> {
        Self::try_from(value).ok().map(Into::into)
    }
}
