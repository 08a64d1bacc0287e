//! The generated protocol: messages, enums, the `ai.AI` client and server.

#![allow(missing_docs, unreachable_pub, non_camel_case_types, clippy::all)]

tonic::include_proto!("ai");

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
