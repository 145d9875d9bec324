//! `sigstore-kms-keybroker`: cosign's KMS plugin for `--key keybroker://ALIAS`.
//! Put it on PATH next to cosign; see keybroker_client::plugin.

use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Whatever happens, cosign gets exactly one JSON answer on stdout: a panic
    // becomes an errorMessage, not a crash.
    let outcome = std::panic::catch_unwind(|| {
        keybroker_client::plugin::run(&args, &mut std::io::stdin().lock())
    });
    let (json, ok) = outcome.unwrap_or_else(|_| {
        (
            serde_json::json!({ "errorMessage": "sigstore-kms-keybroker failed unexpectedly (see stderr)" })
                .to_string(),
            false,
        )
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{json}");
    let _ = out.flush();
    std::process::exit(if ok { 0 } else { 1 });
}
