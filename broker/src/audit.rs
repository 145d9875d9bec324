//! The audit log: one JSON line per decision (allowed, denied, failed), appended
//! and made durable *before* the caller gets an answer, each line carrying the
//! hash of the line before it.
//!
//! Chain: a record's `prev` is `sha256:HEX` of the previous line's exact bytes
//! (without its newline); the first line of a new log has [`GENESIS`]. The daemon
//! reads the last line when it opens an existing log and continues from it; after
//! an external rotation (the file moved away, SIGHUP) the new file's first record
//! continues from the old file's last hash, so `keybroker audit verify OLD NEW`
//! checks across files.
//!
//! Durability: one writer thread takes every record queued so far, writes them
//! with one `write`, `fdatasync`s once, then answers all of them (group commit:
//! the fsync cost is shared by concurrent signers). A failed write or sync is
//! answered with an error for every record in the batch, the file is cut back
//! to its length before the batch, and the chain does not advance: the caller
//! gets UNAVAILABLE and no signature (fail closed).

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::mpsc,
};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

/// `prev` of the first record of a fresh log.
pub const GENESIS: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// Records taken into one write + fdatasync at most.
const MAX_BATCH: usize = 512;

/// `sha256:HEX` of one line's bytes.
pub fn line_hash(line: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(line)))
}

/// Told when its record is durable (or why it is not).
type Reply = oneshot::Sender<Result<(), String>>;

enum Job {
    Append(Map<String, Value>, Reply),
    Reopen(Reply),
}

/// Handle to the writer thread. Cheap to share; dropping the last handle stops
/// the thread after it has written what was queued.
#[derive(Debug)]
pub struct AuditLog {
    tx: std::sync::Mutex<mpsc::Sender<Job>>,
    path: PathBuf,
}

struct Writer {
    path: PathBuf,
    file: File,
    last: String,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log at `path` and starts the writer.
    /// Refuses a log whose last line is incomplete or not a record: that needs a
    /// human look, not a silent repair.
    pub fn open(path: &Path) -> Result<AuditLog, String> {
        let (file, last) = open_file(path, None)?;
        let (tx, rx) = mpsc::channel();
        let mut w = Writer {
            path: path.to_path_buf(),
            file,
            last,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| format!("audit log: cannot start writer thread: {e}"))?;
        Ok(AuditLog {
            tx: std::sync::Mutex::new(tx),
            path: path.to_path_buf(),
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, job: Job) -> Result<(), String> {
        let tx = self
            .tx
            .lock()
            .map_err(|_| "audit log: writer handle poisoned".to_string())?;
        tx.send(job)
            .map_err(|_| "audit log: writer thread has stopped".to_string())
    }

    /// Appends `record` (its `prev` is set by the writer) and returns once it is
    /// on disk. An error means the record is not durable.
    pub async fn append(&self, record: Map<String, Value>) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Append(record, tx))?;
        rx.await
            .map_err(|_| "audit log: writer thread has stopped".to_string())?
    }

    /// Re-opens the path (after logrotate moved the file away): the new file's
    /// first record continues the chain.
    pub async fn reopen(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Reopen(tx))?;
        rx.await
            .map_err(|_| "audit log: writer thread has stopped".to_string())?
    }
}

/// Opens `path` for appending and finds the hash to continue from: the last
/// line's, else `carry` (the previous file's last hash), else [`GENESIS`].
fn open_file(path: &Path, carry: Option<&str>) -> Result<(File, String), String> {
    let shown = path.display();
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("audit log {shown}: {e}"))?;
    let len = file
        .metadata()
        .map_err(|e| format!("audit log {shown}: {e}"))?
        .len();
    if len == 0 {
        return Ok((file, carry.unwrap_or(GENESIS).to_string()));
    }
    // The last line is within the last 64 KiB (records are a few KiB at most).
    let tail_len = len.min(64 * 1024);
    file.seek(SeekFrom::Start(len - tail_len))
        .map_err(|e| format!("audit log {shown}: {e}"))?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    file.read_to_end(&mut tail)
        .map_err(|e| format!("audit log {shown}: {e}"))?;
    if tail.last() != Some(&b'\n') {
        return Err(format!(
            "audit log {shown}: ends in an incomplete line (a crash during a write, or an edit); check it with `keybroker audit verify`, move it aside and restart"
        ));
    }
    let body = &tail[..tail.len() - 1];
    let last_line = match body.iter().rposition(|b| *b == b'\n') {
        Some(i) => &body[i + 1..],
        None if tail_len == len => body,
        None => {
            return Err(format!(
                "audit log {shown}: last line longer than 64 KiB; not a keybroker audit log?"
            ))
        }
    };
    let parsed: Result<Map<String, Value>, _> = serde_json::from_slice(last_line);
    match parsed {
        Ok(m) if m.get("prev").is_some_and(Value::is_string) => {}
        _ => {
            return Err(format!(
                "audit log {shown}: last line is not an audit record; check it with `keybroker audit verify`"
            ))
        }
    }
    Ok((file, line_hash(last_line)))
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut records = Vec::new();
            let mut pending = Some(first);
            loop {
                match pending.take() {
                    Some(Job::Append(r, tx)) => records.push((r, tx)),
                    Some(Job::Reopen(tx)) => {
                        // Everything queued before the reopen goes to the old file.
                        self.write_batch(std::mem::take(&mut records));
                        let _ = tx.send(self.reopen());
                    }
                    None => {}
                }
                if records.len() >= MAX_BATCH {
                    break;
                }
                match rx.try_recv() {
                    Ok(job) => pending = Some(job),
                    Err(_) => break,
                }
            }
            self.write_batch(records);
        }
    }

    fn reopen(&mut self) -> Result<(), String> {
        let (file, last) = open_file(&self.path, Some(&self.last))?;
        if last != self.last {
            tracing::warn!(
                path = %self.path.display(),
                "audit log: the file at this path does not continue our chain; new records continue from the last one we wrote"
            );
        }
        self.file = file;
        tracing::info!(path = %self.path.display(), "audit log reopened");
        Ok(())
    }

    fn write_batch(&mut self, records: Vec<(Map<String, Value>, Reply)>) {
        if records.is_empty() {
            return;
        }
        let start_hash = self.last.clone();
        let mut buf = Vec::new();
        let mut waiters = Vec::with_capacity(records.len());
        for (mut record, tx) in records {
            record.insert("prev".into(), Value::String(self.last.clone()));
            let line = match serde_json::to_vec(&Value::Object(record)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(format!("audit record: {e}")));
                    continue;
                }
            };
            self.last = line_hash(&line);
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            waiters.push(tx);
        }
        let result = self.commit(&buf);
        if let Err(e) = &result {
            tracing::error!(path = %self.path.display(), "audit log write failed, refusing to sign: {e}");
            self.last = start_hash;
        }
        for tx in waiters {
            let _ = tx.send(result.clone());
        }
    }

    fn commit(&mut self, buf: &[u8]) -> Result<(), String> {
        let before = self.file.metadata().map(|m| m.len()).ok();
        let r = self.file.write_all(buf).and_then(|_| self.file.sync_data());
        if let Err(e) = r {
            // Cut a partial batch off, so the log still ends on a whole record.
            if let Some(len) = before {
                let _ = self.file.set_len(len);
            }
            return Err(format!("audit log {}: {e}", self.path.display()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("n".into(), n.into());
        m
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[tokio::test]
    async fn chains_records_across_restarts_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        log.append(rec(1)).await.unwrap();
        log.append(rec(2)).await.unwrap();
        drop(log);
        // A restart continues from the last line.
        let log = AuditLog::open(&path).unwrap();
        log.append(rec(3)).await.unwrap();
        let l = lines(&path);
        assert_eq!(l.len(), 3);
        let prev = |s: &str| {
            serde_json::from_str::<Value>(s).unwrap()["prev"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(prev(&l[0]), GENESIS);
        assert_eq!(prev(&l[1]), line_hash(l[0].as_bytes()));
        assert_eq!(prev(&l[2]), line_hash(l[1].as_bytes()));
        // Rotation: the file moves away; the new one continues the chain.
        let old = dir.path().join("audit.jsonl.1");
        std::fs::rename(&path, &old).unwrap();
        log.reopen().await.unwrap();
        log.append(rec(4)).await.unwrap();
        let new = lines(&path);
        assert_eq!(new.len(), 1);
        assert_eq!(prev(&new[0]), line_hash(l[2].as_bytes()));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[tokio::test]
    async fn concurrent_appends_form_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = std::sync::Arc::new(AuditLog::open(&path).unwrap());
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(rec(i)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let l = lines(&path);
        assert_eq!(l.len(), 200);
        let mut expect = GENESIS.to_string();
        for line in &l {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["prev"], Value::String(expect.clone()));
            expect = line_hash(line.as_bytes());
        }
    }

    #[test]
    fn refuses_a_log_ending_in_a_partial_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(
            &path,
            format!("{{\"prev\":\"{GENESIS}\"}}\n{{\"prev\":\"sha"),
        )
        .unwrap();
        let err = AuditLog::open(&path).unwrap_err();
        assert!(err.contains("incomplete line"), "{err}");
        std::fs::write(&path, "not json\n").unwrap();
        let err = AuditLog::open(&path).unwrap_err();
        assert!(err.contains("not an audit record"), "{err}");
    }

    #[tokio::test]
    async fn a_failed_write_fails_the_record_and_keeps_the_chain() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        if !Path::new("/dev/full").exists() {
            return;
        }
        let log = AuditLog::open(Path::new("/dev/full")).unwrap();
        let err = log.append(rec(1)).await.unwrap_err();
        assert!(err.contains("No space left"), "{err}");
    }

    use std::os::unix::fs::PermissionsExt;
}
