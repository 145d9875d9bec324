//! cosign's classic storage format (DESIGN.md §5): the `.sig` manifest next to the
//! image, one layer per signature, and the `.att` manifest, one DSSE envelope
//! per layer; both appended and never clobbered (`append.rs`).

#[doc(hidden)]
pub mod append;
pub mod attestation;
mod signature;
mod verify;

pub(crate) use append::settle_delay;
pub use append::{append_layer, Layer, Mode};
pub use signature::{
    append_signature, signature_tag, SignatureLayer, SIGNATURE_ANNOTATION, SIMPLESIGNING_MEDIA_TYPE,
};
pub use verify::{verify_image, Verified};
