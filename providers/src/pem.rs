//! Minimal PEM framing. Lenient on read (any line width, CRLF, surrounding text),
//! 64-column lines on write, as Go's encoding/pem and cosign do.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use zeroize::Zeroizing;

use crate::{Error, Result};

/// Finds the first PEM block and returns its label and decoded body.
pub fn decode(text: &str) -> Result<(String, Zeroizing<Vec<u8>>)> {
    let begin = text
        .find("-----BEGIN ")
        .ok_or_else(|| Error::KeyFormat("no PEM block found".into()))?;
    let after = &text[begin + "-----BEGIN ".len()..];
    let label_end = after
        .find("-----")
        .ok_or_else(|| Error::KeyFormat("malformed PEM header".into()))?;
    let label = &after[..label_end];
    let body_start = &after[label_end + 5..];
    let end_marker = format!("-----END {label}-----");
    let body_end = body_start
        .find(&end_marker)
        .ok_or_else(|| Error::KeyFormat(format!("PEM block {label:?} has no END line")))?;
    let b64: Zeroizing<String> = Zeroizing::new(
        body_start[..body_end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect(),
    );
    let der = B64
        .decode(b64.as_bytes())
        .map_err(|_| Error::KeyFormat(format!("PEM block {label:?} is not valid base64")))?;
    Ok((label.to_string(), Zeroizing::new(der)))
}

/// Encodes `der` as a PEM block with 64-column lines and a trailing newline.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
