//! The hash-chained audit log: `keybroker audit verify` (client) over any
//! bytes, and the daemon's reading of an existing log when it opens it and
//! continues the chain (broker).
//!
//! Properties: a log the client accepts has one record per line and ends at
//! the last line's hash, and the daemon can continue it; records chained as
//! the daemon chains them verify, across a rotation too, and a JSON-equivalent
//! edit of any record but the last breaks the chain; a record the daemon
//! appends to an accepted log verifies with the rest.
#![no_main]

use std::{path::PathBuf, sync::OnceLock};

use keybroker_broker::audit::{line_hash, AuditLog, GENESIS};
use keybroker_client::audit::verify_files;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("keybroker-fuzz-audit-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir().join(name);
    std::fs::write(&p, bytes).expect("scratch file");
    p
}

fn joined(lines: &[Vec<u8>]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| l.iter().copied().chain([b'\n']))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let raw = write("raw", data);
    let verdict = verify_files(&[&raw]);
    if let Ok(summary) = &verdict {
        let lines: Vec<&[u8]> = data[..data.len() - 1].split(|b| *b == b'\n').collect();
        assert_eq!(summary.records, lines.len());
        assert_eq!(summary.head, line_hash(lines[lines.len() - 1]));
        if data.len() < 60 * 1024 {
            let log = AuditLog::open(&raw).expect("the daemon must continue a log that verifies");
            let mut record = Map::new();
            record.insert("decision".into(), Value::from("allowed"));
            runtime()
                .block_on(log.append(record))
                .expect("append to a scratch file");
            drop(log);
            let after = verify_files(&[&raw]).expect("a record the daemon appended verifies");
            assert_eq!(after.records, summary.records + 1);
            assert_eq!(after.starts_from, summary.starts_from);
        }
    }

    // The daemon's chain over whatever JSON objects the input holds.
    let mut prev = GENESIS.to_string();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for chunk in data.split(|b| *b == b'\n') {
        let Ok(mut record) = serde_json::from_slice::<Map<String, Value>>(chunk) else {
            continue;
        };
        record.insert("prev".into(), Value::String(prev.clone()));
        let line = serde_json::to_vec(&Value::Object(record)).expect("JSON");
        prev = line_hash(&line);
        lines.push(line);
    }
    if lines.is_empty() {
        return;
    }
    let n = lines.len();
    let chain = write("chain", &joined(&lines));
    let ok = verify_files(&[&chain]).expect("a chain the daemon wrote verifies");
    assert_eq!(
        (ok.records, ok.head.as_str(), ok.starts_from.as_str()),
        (n, prev.as_str(), GENESIS)
    );
    // Rotated: the same records in two files.
    let cut = data.len() % (n + 1);
    let (a, b) = lines.split_at(cut);
    let (fa, fb) = (write("rot-a", &joined(a)), write("rot-b", &joined(b)));
    assert_eq!(verify_files(&[&fa, &fb]).as_ref(), Ok(&ok));
    if n >= 2 && cut < n {
        // Out of order: refused.
        assert!(cut == 0 || verify_files(&[&fb, &fa]).is_err());
    }
    // A JSON-equivalent edit (a space after `{`) of a record with a successor.
    if n >= 2 {
        let i = data.len() % (n - 1);
        let mut edited = lines.clone();
        edited[i].insert(1, b' ');
        let e = verify_files(&[&write("edited", &joined(&edited))])
            .expect_err("an edited record must break the chain");
        assert!(e.contains(&format!(":{}: chain broken", i + 2)), "{e}");
        // Dropping a record breaks the chain; dropping the first shows as a
        // log that no longer starts at genesis.
        let mut dropped = lines.clone();
        dropped.remove(i);
        match verify_files(&[&write("dropped", &joined(&dropped))]) {
            Ok(s) => assert!(
                i == 0 && s.starts_from != GENESIS,
                "dropped record {i} unnoticed"
            ),
            Err(_) => assert!(i > 0),
        }
    }
});
