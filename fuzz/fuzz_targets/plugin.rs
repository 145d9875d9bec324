//! The cosign KMS plugin protocol (sigstore's cliplugin v1): argv, the
//! arguments JSON (Go-style case-insensitive field names, deadlines,
//! options), stdin, and RFC 3339 deadlines.
//!
//! The broker is out of reach here (`KEYBROKER_URL` without TLS files), so
//! every call that gets as far as the broker fails before connecting.
//! Properties: the answer is exactly one line of JSON, either the method's
//! result (only the two broker-less methods can succeed here) or
//! `{"errorMessage": "…"}` with a message; an RFC 3339 time prints and parses
//! back to the same instant.
#![no_main]

use std::{
    sync::Once,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use keybroker_client::plugin::{parse_rfc3339, run, ALGORITHM, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (the
/// inverse of days-from-civil; H. Hinnant's published algorithm).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn rfc3339(t: SystemTime) -> Option<String> {
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let back = d.as_secs() as i64 + i64::from(d.subsec_nanos() > 0);
            let nanos = (1_000_000_000 - d.subsec_nanos()) % 1_000_000_000;
            (-back, nanos)
        }
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil(days);
    if !(0..=9999).contains(&y) {
        return None;
    }
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

fuzz_target!(|data: &[u8]| {
    static ENV: Once = Once::new();
    ENV.call_once(|| {
        std::env::set_var("KEYBROKER_URL", "https://127.0.0.1:9");
        for v in [
            "KEYBROKER_TLS_CERT",
            "KEYBROKER_TLS_KEY",
            "KEYBROKER_TLS_CA",
            "KEYBROKER_SOCKET",
        ] {
            std::env::remove_var(v);
        }
    });
    // First line: the arguments JSON; the rest: the message on stdin.
    let (args, mut stdin) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let args = String::from_utf8_lossy(args).into_owned();
    if let Some(t) = parse_rfc3339(&args) {
        if let Some(text) = rfc3339(t) {
            assert_eq!(
                parse_rfc3339(&text),
                Some(t),
                "{args:?} printed as {text:?}"
            );
        }
        // Nanoseconds always fit: the parser keeps nine digits.
        let _ = t.checked_add(Duration::from_nanos(1));
    }
    let (out, ok) = run(&[PROTOCOL_VERSION.to_string(), args], &mut stdin);
    assert!(!out.contains('\n'), "the answer must be one line: {out:?}");
    let v: Value = serde_json::from_str(&out).expect("the answer is JSON");
    let obj = v.as_object().expect("the answer is an object");
    assert_eq!(obj.len(), 1, "{out}");
    if ok {
        let algo = Value::from(ALGORITHM);
        assert!(
            v.pointer("/defaultAlgorithm/defaultAlgorithm") == Some(&algo)
                || v.pointer("/supportedAlgorithms/supportedAlgorithms/0") == Some(&algo),
            "{out}"
        );
    } else {
        let m = v["errorMessage"].as_str().expect("errorMessage is text");
        assert!(!m.is_empty());
    }
});
