//! Switchboard's wire protocol: generated messages, clients and servers for
//! package `switchboard.v1`, plus the file descriptor set that server
//! reflection serves.

#![allow(unreachable_pub, clippy::all)]

pub mod codec;

/// Package `switchboard.v1`.
pub mod v1 {
    tonic::include_proto!("switchboard.v1");
}

/// Encoded `FileDescriptorSet` of every proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("switchboard_descriptor");
