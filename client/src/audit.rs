//! `keybroker audit verify`: checks keybrokerd's hash-chained audit log.
//!
//! Each line is a JSON object whose `prev` is `sha256:HEX` of the previous
//! line's bytes (without the newline); a log's first line has the all-zero
//! genesis hash, or continues the file it was rotated from. Given several files
//! in order (oldest first), the links between them are checked too.

use std::path::Path;

use sha2::{Digest, Sha256};

/// `prev` of the first record of a fresh log (as keybrokerd writes it).
pub const GENESIS: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// What a successful check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    /// Records checked.
    pub records: usize,
    /// Hash the first file starts from (`GENESIS`, or a rotated-away file's head).
    pub starts_from: String,
    /// Hash of the last record: record it elsewhere to detect a truncated tail later.
    pub head: String,
}

fn line_hash(line: &[u8]) -> String {
    format!("sha256:{}", hex_encode(&Sha256::digest(line)))
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Verifies `files` as one chain, oldest first. The error names the first broken
/// link: file, line number and what is wrong.
pub fn verify_files(files: &[&Path]) -> Result<ChainSummary, String> {
    let mut expect: Option<String> = None;
    let mut starts_from = None;
    let mut records = 0;
    for path in files {
        let shown = path.display();
        let data = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
        if data.is_empty() {
            continue;
        }
        if data.last() != Some(&b'\n') {
            let n = data.split(|b| *b == b'\n').count();
            return Err(format!(
                "{shown}:{n}: incomplete last line (truncated, or written by something else)"
            ));
        }
        for (i, line) in data[..data.len() - 1].split(|b| *b == b'\n').enumerate() {
            let at = format!("{shown}:{}", i + 1);
            let v: serde_json::Value = serde_json::from_slice(line)
                .map_err(|e| format!("{at}: not a JSON record ({e}): edited or damaged"))?;
            let prev = v
                .get("prev")
                .and_then(|p| p.as_str())
                .ok_or_else(|| format!("{at}: record has no \"prev\" hash"))?;
            match &expect {
                None => {
                    starts_from = Some(prev.to_string());
                }
                Some(want) if want == prev => {}
                Some(want) => {
                    return Err(if i == 0 {
                        format!(
                            "{at}: first record does not continue the previous file (prev {prev}, the previous file ends at {want}): a file is missing or out of order"
                        )
                    } else {
                        format!(
                            "{at}: chain broken: prev is {prev}, but line {} hashes to {want} — line {} or an earlier one was edited, or lines were removed or inserted",
                            i, i
                        )
                    })
                }
            }
            expect = Some(line_hash(line));
            records += 1;
        }
    }
    let head = expect.ok_or_else(|| "no audit records in the given files".to_string())?;
    Ok(ChainSummary {
        records,
        starts_from: starts_from.unwrap_or_else(|| GENESIS.into()),
        head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize, start: &str) -> Vec<String> {
        let mut prev = start.to_string();
        (0..n)
            .map(|i| {
                let l = format!("{{\"n\":{i},\"decision\":\"allowed\",\"prev\":\"{prev}\"}}");
                prev = line_hash(l.as_bytes());
                l
            })
            .collect()
    }

    fn write(dir: &Path, name: &str, lines: &[String]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(
            &p,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        p
    }

    #[test]
    fn accepts_a_chain_and_catches_edits_removals_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let lines = chain(5, GENESIS);
        let p = write(dir.path(), "a", &lines);
        let ok = verify_files(&[&p]).unwrap();
        assert_eq!(ok.records, 5);
        assert_eq!(ok.starts_from, GENESIS);
        assert_eq!(ok.head, line_hash(lines[4].as_bytes()));

        let mut edited = lines.clone();
        edited[2] = edited[2].replace("allowed", "denied");
        let e = verify_files(&[&write(dir.path(), "b", &edited)]).unwrap_err();
        assert!(e.contains("b:4: chain broken"), "{e}");

        let mut removed = lines.clone();
        removed.remove(1);
        let e = verify_files(&[&write(dir.path(), "c", &removed)]).unwrap_err();
        assert!(e.contains("c:2: chain broken"), "{e}");

        let p = dir.path().join("d");
        let text = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
        std::fs::write(&p, &text[..text.len() - 10]).unwrap();
        let e = verify_files(&[&p]).unwrap_err();
        assert!(e.contains("d:5: incomplete"), "{e}");
    }

    #[test]
    fn follows_the_chain_across_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let old = chain(3, GENESIS);
        let new = chain(2, &line_hash(old[2].as_bytes()));
        let a = write(dir.path(), "old", &old);
        let b = write(dir.path(), "new", &new);
        assert_eq!(verify_files(&[&a, &b]).unwrap().records, 5);
        // The newer file alone starts from the old head, and says so.
        assert_eq!(
            verify_files(&[&b]).unwrap().starts_from,
            line_hash(old[2].as_bytes())
        );
        let e = verify_files(&[&b, &a]).unwrap_err();
        assert!(e.contains("old:1: first record does not continue"), "{e}");
    }
}
