//! Round trips over generated inputs (proptest): cosign's encrypted key format
//! (encrypt → decrypt gives the key back; another password is refused), PEM
//! encode → decode, and ECDSA sign → verify (a changed digest fails).

use keybroker_providers::{cosign_key, ecdsa::verify_digest, pem, P256Signer, Sha256Digest};
use proptest::prelude::*;

proptest! {
    // scrypt at N=65536 costs ~0.1 s per key even optimized: few cases.
    #![proptest_config(ProptestConfig::with_cases(6))]

    #[test]
    fn cosign_key_files_decrypt_to_what_was_encrypted(
        password in proptest::collection::vec(any::<u8>(), 0..24),
        other in proptest::collection::vec(any::<u8>(), 1..24),
    ) {
        prop_assume!(password != other);
        let (_, der) = P256Signer::generate().unwrap();
        let envelope = cosign_key::encrypt(&der, &password).unwrap();
        let back = cosign_key::decrypt(&envelope, &password).unwrap();
        prop_assert_eq!(back.as_slice(), der.as_slice());
        prop_assert!(cosign_key::decrypt(&envelope, &other).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn pem_decodes_to_what_was_encoded(
        label in "[A-Z]{1,10}( [A-Z]{1,10}){0,3}",
        der in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let text = pem::encode(&label, &der);
        let (l, back) = pem::decode(&text).unwrap();
        prop_assert_eq!(l, label);
        prop_assert_eq!(back.as_slice(), der.as_slice());
    }

    #[test]
    fn signatures_verify_for_their_digest_only(
        data in proptest::collection::vec(any::<u8>(), 0..200),
        flip in 0usize..256,
    ) {
        let (signer, _) = P256Signer::generate().unwrap();
        let digest = Sha256Digest::of(&data);
        let der = signer.sign_digest(&digest).unwrap();
        prop_assert!(verify_digest(signer.public_key_pem(), &digest, &der).is_ok());
        let mut changed = *digest.as_bytes();
        changed[flip / 8] ^= 1 << (flip % 8);
        let changed = Sha256Digest::try_from(changed.as_slice()).unwrap();
        prop_assert!(verify_digest(signer.public_key_pem(), &changed, &der).is_err());
    }
}
