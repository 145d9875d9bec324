//! Round trips between what the daemon builds and what it recognizes, over
//! generated inputs (proptest): a payload built by SignImage is recognized by
//! SignMessage as exactly that image, digest and annotations; DSSE PAE framing
//! parses back to its parts; an AttestImage statement in PAE is recognized with
//! its subject and predicate type.

use std::collections::BTreeMap;

use keybroker_broker::{attest, message, payload};
use proptest::prelude::*;

/// Repositories with a registry host, as `keybroker sign` sends them.
fn repository() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,7}\\.example\\.com(:[1-9][0-9]{1,4})?/[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}"
}

fn digest() -> impl Strategy<Value = String> {
    "[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}"))
}

/// Annotations a caller may set: printable values with quotes and backslashes.
fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map("[a-z][a-z0-9.-]{0,15}", "[ -~]{0,30}", 0..5)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_built_payload_is_recognized_as_itself(
        repo in repository(),
        digest in digest(),
        ann in annotations(),
    ) {
        prop_assert!(payload::validate_docker_reference(&repo).is_ok(), "{}", repo);
        let bytes = payload::simple_signing(&repo, &digest, &ann);
        match message::classify(&bytes) {
            Ok(message::Kind::SimpleSigning(img)) => {
                prop_assert_eq!(img.repository.as_deref(), Some(repo.as_str()));
                prop_assert_eq!(img.digest, digest);
                prop_assert_eq!(img.annotations, ann);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn pae_parses_back_to_its_parts(
        payload_type in "[ -~]{0,40}",
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let framed = attest::pae(&payload_type, &body);
        let (t, b) = message::parse_pae(&framed).expect("our own PAE parses");
        prop_assert_eq!(t, payload_type.as_bytes());
        prop_assert_eq!(b, body.as_slice());
        // One byte more or less is no longer PAE.
        let mut longer = framed.clone();
        longer.push(b'x');
        prop_assert!(message::parse_pae(&longer).is_none());
        prop_assert!(message::parse_pae(&framed[..framed.len() - 1]).is_none());
    }

    #[test]
    fn an_attestation_statement_is_recognized_with_its_subject(
        repo in repository(),
        digest in digest(),
        predicate_type in "https://[a-z]{1,10}\\.example/[a-z0-9/]{1,20}",
        fields in proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,20}", 0..4),
    ) {
        let predicate = serde_json::to_value(&fields).unwrap();
        let statement = attest::statement(&repo, &digest, &predicate_type, &predicate);
        let framed = attest::pae(attest::PAYLOAD_TYPE, &statement);
        match message::classify(&framed) {
            Ok(message::Kind::InToto { predicate_type: t, subjects }) => {
                prop_assert_eq!(t, predicate_type);
                prop_assert_eq!(subjects.len(), 1);
                prop_assert_eq!(subjects[0].repository.as_deref(), Some(repo.as_str()));
                prop_assert_eq!(&subjects[0].digest, &digest);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_recognizer(
        msg in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = message::classify(&msg);
    }
}
