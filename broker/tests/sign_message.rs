//! SignMessage on the real keybrokerd (the cosign plugin's path): a cosign
//! simple-signing payload and DSSE PAE bytes carrying an in-toto statement get
//! the image/annotation policy of SignImage (every subject must be allowed);
//! anything else is raw signing, refused unless the key allows raw digests,
//! and the refusal says so. The signature is over SHA-256(message), as given.

mod common;

use common::Daemon;

use std::{
    path::Path,
    process::{Command, Stdio},
};

use keybroker_proto::v1::SignMessageRequest;
use keybroker_providers::{ecdsa::verify_digest, Sha256Digest};
use tonic::Code;

async fn client(socket: &Path) -> keybroker_proto::Client {
    common::client(socket)
        .await
        .max_decoding_message_size(4 << 20)
        .max_encoding_message_size(4 << 20)
}

const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// cosign's simple-signing payload, as `cosign sign` writes it.
fn simple(image: &str, optional: &str) -> Vec<u8> {
    format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"{image}"}},"image":{{"docker-manifest-digest":"sha256:{HEX}"}},"type":"cosign container image signature"}},"optional":{optional}}}"#
    )
    .into_bytes()
}

fn pae(body: &str) -> Vec<u8> {
    let t = "application/vnd.in-toto+json";
    format!("DSSEv1 {} {t} {} {body}", t.len(), body.len()).into_bytes()
}

/// `cosign attest`'s statement (cosign 3 field order) for these subject names.
fn attestation(names: &[&str]) -> Vec<u8> {
    let subjects: Vec<String> = names
        .iter()
        .map(|n| format!(r#"{{"name":"{n}","digest":{{"sha256":"{HEX}"}}}}"#))
        .collect();
    pae(&format!(
        r#"{{"_type":"https://in-toto.io/Statement/v0.1","subject":[{}],"predicateType":"https://slsa.dev/provenance/v1","predicate":{{"buildDefinition":{{}}}}}}"#,
        subjects.join(",")
    ))
}

/// cosign 3's `sign` statement: the digest alone, annotations on the subject.
fn cosign3_sign(annotations: &str) -> Vec<u8> {
    pae(&format!(
        r#"{{"_type":"https://in-toto.io/Statement/v1","subject":[{{"digest":{{"sha256":"{HEX}"}},"annotations":{annotations}}}],"predicateType":"https://sigstore.dev/cosign/sign/v1","predicate":{{}}}}"#
    ))
}

#[tokio::test]
async fn messages_get_the_policy_of_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let signing = dir.path().join("k.pem");
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    std::fs::write(
        &signing,
        keybroker_providers::pem::encode("PRIVATE KEY", &der),
    )
    .unwrap();
    let socket = dir.path().join("m.sock");
    let audit = dir.path().join("audit.jsonl");
    let cfg = dir.path().join("m.toml");
    let uid = unsafe { libc::geteuid() };
    let k = signing.display();
    std::fs::write(
        &cfg,
        format!(
            "[server]\nsocket = \"{}\"\naudit_log = \"{}\"\nmax_request_bytes = 4194304\n\
             [keys.k]\nref = \"{k}\"\n[keys.raw]\nref = \"{k}\"\n[keys.any]\nref = \"{k}\"\n\
             [[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"k\"]\nimages = [\"reg.test/acme/**\", \"index.docker.io/acme/*\"]\nrequire_annotations = [\"commit\"]\n\
             [[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"raw\"]\nimages = [\"reg.test/acme/**\"]\nallow_raw_digest = true\n\
             [[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"any\"]\nimages = [\"**\"]\n",
            socket.display(),
            audit.display(),
        ),
    )
    .unwrap();
    let _d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
            .arg("--config")
            .arg(&cfg)
            .env_remove("KEYBROKER_SOCKET")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = client(&socket).await;
    let sign = |key: &str, message: Vec<u8>| {
        let req = SignMessageRequest {
            key: key.into(),
            message: message.clone(),
        };
        let mut c = c.clone();
        async move {
            c.sign_message(req).await.map(|r| {
                let r = r.into_inner();
                let pem = r.key.unwrap().public_key_pem;
                verify_digest(&pem, &Sha256Digest::of(&message), &r.signature)
                    .expect("signature over SHA-256(message)");
                r.kind
            })
        }
    };

    // (a) simple signing: image and annotation policy as SignImage.
    let kind = sign("k", simple("reg.test/acme/api", r#"{"commit":"abc"}"#))
        .await
        .expect("allowed");
    assert_eq!(kind, "simple-signing");
    let e = sign("k", simple("reg.test/acme/api", "null"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("commit"), "{e}");
    let e = sign("k", simple("reg.test/other/api", r#"{"commit":"abc"}"#))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("reg.test/other/api"), "{e}");
    // A Docker Hub name without a registry is matched as Docker reads it.
    assert_eq!(
        sign("k", simple("acme/web", r#"{"commit":"abc"}"#))
            .await
            .unwrap(),
        "simple-signing"
    );
    // The broker's own annotations cannot be forged through a message.
    let e = sign(
        "k",
        simple(
            "reg.test/acme/api",
            r#"{"commit":"abc","keybroker.dev/caller":"unix:uid=0,gid=0"}"#,
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // (b) DSSE PAE of an in-toto statement: every subject must be allowed;
    // attestations carry no annotations, so none are required.
    assert_eq!(
        sign(
            "k",
            attestation(&["reg.test/acme/api", "reg.test/acme/web"])
        )
        .await
        .unwrap(),
        "in-toto"
    );
    let e = sign("k", attestation(&["reg.test/acme/api", "reg.test/evil/x"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("reg.test/evil/x"), "{e}");
    // cosign 3's sign statement: annotations required like SignImage; without
    // a subject name only an images = ["**"] rule admits it.
    let e = sign("k", cosign3_sign(r#"{"commit":"abc"}"#))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("names no repository"), "{e}");
    assert_eq!(
        sign("any", cosign3_sign(r#"{"commit":"abc"}"#))
            .await
            .unwrap(),
        "in-toto"
    );
    // Malformed inside a recognized framing: INVALID_ARGUMENT.
    let e = sign("k", pae("{not json")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // Raw: refused where the key does not allow raw digests, and said so.
    for raw in [
        b"hello".to_vec(),
        br#"{"any":"json"}"#.to_vec(),
        b"DSSEv1 16 application/json 2 {}".to_vec(),
    ] {
        let e = sign("k", raw.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        assert!(
            e.message().contains("raw signing") && e.message().contains("allow_raw_digest"),
            "{e}"
        );
        assert_eq!(sign("raw", raw).await.unwrap(), "raw");
    }
    // Over 1 MiB (the transport allows 4 MiB here): INVALID_ARGUMENT.
    let e = sign("raw", vec![b'x'; (1 << 20) + 1]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(sign("raw", vec![b'x'; 1 << 20]).await.is_ok());
    let e = sign("nope", b"x".to_vec()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // The audit log records kind, images and the caller.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records.iter().all(|r| r["rpc"] == "SignMessage"));
    let first = &records[0];
    assert_eq!(first["decision"], "allowed");
    assert_eq!(first["kind"], "simple-signing");
    assert_eq!(first["image"], "reg.test/acme/api");
    assert_eq!(first["digest"], format!("sha256:{HEX}").as_str());
    assert_eq!(first["caller"]["uid"], uid);
    assert_eq!(
        first["message_sha256"],
        hex(&Sha256Digest::of(&simple(
            "reg.test/acme/api",
            r#"{"commit":"abc"}"#
        )))
    );
    let in_toto = records
        .iter()
        .find(|r| r["kind"] == "in-toto" && r["decision"] == "allowed")
        .unwrap();
    assert_eq!(in_toto["subjects"][1]["image"], "reg.test/acme/web");
    assert_eq!(in_toto["predicate_type"], "https://slsa.dev/provenance/v1");
    let raw_denied = records
        .iter()
        .find(|r| r["kind"] == "raw" && r["decision"] == "denied")
        .unwrap();
    assert_eq!(raw_denied["raw_reason"], "neither JSON nor DSSE PAE");
}

fn hex(d: &Sha256Digest) -> String {
    d.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}
