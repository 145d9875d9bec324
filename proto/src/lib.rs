//! The keybroker.v1 gRPC API: generated types, client and server.
//! Nothing but generated code lives here (see ARCHITECTURE.md).

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keybroker.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keybroker_descriptor");
}
