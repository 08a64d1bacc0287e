//! The generated protocol: messages, enums, the `ai.AI` client and server.

#![allow(missing_docs, unreachable_pub, non_camel_case_types, clippy::all)]

tonic::include_proto!("ai");

/// The encoded `FileDescriptorSet` of `proto/ai.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ai_descriptor");
