//! Round trips over generated inputs (proptest): cosign's encrypted key format
//! (encrypt → decrypt gives the key back; another password is refused), PEM
//! encode → decode, ECDSA sign → verify (a changed digest fails), and the
//! ASN.1 DER ↔ raw r‖s forms of a signature (what a KMS or a JWS-style backend
//! returns), with non-minimal DER refused.

use keybroker_providers::{cosign_key, ecdsa::verify_digest, pem, P256Signer, Sha256Digest};
use p256::ecdsa::Signature;
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// What we sign is strict DER: parsed into r‖s (64 bytes) and encoded
    /// again it is the same bytes, and it still verifies.
    #[test]
    fn our_signatures_are_strict_der_and_round_trip_through_r_s(
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let (signer, _) = P256Signer::generate().unwrap();
        let digest = Sha256Digest::of(&data);
        let der = signer.sign_digest(&digest).unwrap();
        let raw = Signature::from_der(&der).unwrap().to_bytes();
        prop_assert_eq!(raw.len(), 64);
        let again = Signature::from_slice(&raw).unwrap().to_der();
        prop_assert_eq!(again.as_bytes(), der.as_slice());
        prop_assert!(verify_digest(signer.public_key_pem(), &digest, again.as_bytes()).is_ok());
    }

    /// Any r‖s with both scalars in [1, n) encodes to DER that decodes to the
    /// same r‖s; zero or out-of-range scalars are refused, never wrapped.
    #[test]
    fn raw_r_s_round_trips_through_der(
        r in any::<[u8; 32]>(),
        s in any::<[u8; 32]>(),
        small in 0usize..3,
    ) {
        let mut raw = [0u8; 64];
        raw[..32].copy_from_slice(&r);
        raw[32..].copy_from_slice(&s);
        // Short integers (leading zero bytes) are where DER length rules bite.
        for b in raw.iter_mut().take(small * 8) {
            *b = 0;
        }
        // n, the order of P-256's group, big-endian.
        const N: [u8; 32] = [
            0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2,
            0xfc, 0x63, 0x25, 0x51,
        ];
        let in_range = |x: &[u8]| x.iter().any(|b| *b != 0) && x < &N[..];
        match Signature::from_slice(&raw) {
            Ok(sig) => {
                prop_assert!(in_range(&raw[..32]) && in_range(&raw[32..]));
                let der = sig.to_der();
                let back = Signature::from_der(der.as_bytes()).unwrap();
                let back = back.to_bytes();
                prop_assert_eq!(back.as_slice(), &raw[..]);
            }
            Err(_) => prop_assert!(!in_range(&raw[..32]) || !in_range(&raw[32..])),
        }
    }

    /// A signature whose r carries a superfluous leading zero byte is the same
    /// number in non-minimal DER: refused (no malleable encodings accepted).
    #[test]
    fn non_minimal_der_is_refused(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let (signer, _) = P256Signer::generate().unwrap();
        let digest = Sha256Digest::of(&data);
        let der = signer.sign_digest(&digest).unwrap();
        // SEQUENCE len, INTEGER(0x02) rlen r…: pad r with one more 0x00.
        prop_assume!(der[1] < 0x7f && der[2] == 0x02);
        let rlen = der[3] as usize;
        let mut padded = vec![0x30, der[1] + 1, 0x02, (rlen + 1) as u8, 0x00];
        padded.extend_from_slice(&der[4..]);
        prop_assert!(verify_digest(signer.public_key_pem(), &digest, &der).is_ok());
        prop_assert!(verify_digest(signer.public_key_pem(), &digest, &padded).is_err());
    }
}
