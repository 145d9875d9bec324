//! Key reference URIs (`file`, `env`, `k8s`, `awskms`, `gcpkms`, `hashivault`,
//! `openbao`, `gitlab`, `github`, plain paths).
//!
//! Properties: a parsed reference prints as text that parses back to the same
//! reference; its scheme is the one written (plain paths: `file`).
#![no_main]

use keybroker_providers::KeyRef;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = KeyRef::parse(text) else {
        return;
    };
    let shown = r.to_string();
    let again = KeyRef::parse(&shown)
        .unwrap_or_else(|e| panic!("{text:?} printed as {shown:?}, which does not parse: {e}"));
    assert_eq!(r, again, "{text:?} → {shown:?}");
    assert_eq!(r.scheme(), again.scheme());
    assert_eq!(format!("{r:?}"), format!("KeyRef({shown})"));
    match text.split_once("://") {
        Some((scheme, _)) => assert_eq!(r.scheme(), scheme),
        None => assert_eq!(r.scheme(), "file"),
    }
});
