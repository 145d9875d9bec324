//! cosign's classic storage format (DESIGN.md §5): the `.sig` manifest next to the
//! image, one layer per signature, appended and never clobbered.

mod signature;
mod verify;

pub use signature::{
    append_signature, signature_tag, SignatureLayer, SIGNATURE_ANNOTATION, SIMPLESIGNING_MEDIA_TYPE,
};
pub use verify::{verify_image, Verified};
