//! The decision log: every decision, login and outcome as one JSON line, so
//! analysts can see what the rules saw and `riskgate replay` can backtest a
//! candidate pack on real traffic.
//!
//! Off the hot path: a request only builds its record and offers it to a
//! bounded channel; a writer thread serialises and writes. When the channel
//! is full the record is dropped and counted, never waited for: the log must
//! not slow down payments. The file rotates by size (FILE -> FILE.1 -> ...).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::decision::Decision;
use crate::state::ProfileView;

/// One line of the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Evaluate(Box<Evaluation>),
    Login(LoginRecord),
    Outcome(OutcomeRecord),
}

impl Record {
    /// Event time, Unix ms: replays go in this order.
    pub fn timestamp_ms(&self) -> i64 {
        match self {
            Record::Evaluate(e) => e.request.timestamp_ms,
            Record::Login(l) => l.timestamp_ms,
            Record::Outcome(o) => o.timestamp_ms,
        }
    }
}

/// A decided recharge, with everything the rules saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub request: LoggedRequest,
    /// Window values as the rules read them, by name.
    pub windows: BTreeMap<String, i64>,
    pub location: Option<LoggedLocation>,
    pub profile: ProfileView,
    /// Lists the request is on.
    pub lists: Vec<String>,
    pub decision: Decision,
    /// Time spent deciding, in microseconds.
    pub latency_us: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoggedRequest {
    pub request_id: String,
    pub user_id: String,
    pub amount: i64,
    pub currency: String,
    pub channel: String,
    pub product: String,
    pub target: String,
    pub ip: String,
    pub device_id: String,
    pub timestamp_ms: i64,
    pub real_name_verified: bool,
    pub account_status: String,
    pub created_at_ms: i64,
    pub has_purchase_history: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoggedLocation {
    pub country: String,
    pub region: String,
    pub city: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginRecord {
    pub event_id: String,
    pub user_id: String,
    pub succeeded: bool,
    pub ip: String,
    pub device_id: String,
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutcomeRecord {
    pub request_id: String,
    pub user_id: String,
    /// succeeded, failed, chargeback, challenge_passed, challenge_failed.
    pub outcome: String,
    pub timestamp_ms: i64,
}

/// Where and how the log is written.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub path: PathBuf,
    /// Rotate when the file grows past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (FILE.1 .. FILE.keep).
    pub keep: usize,
    /// Records that may wait for the writer; past it they are dropped.
    pub queue: usize,
}

enum Msg {
    Record(Record),
    Stop,
}

/// A handle to the log. Cheap to clone.
#[derive(Clone)]
pub struct DecisionLog {
    tx: SyncSender<Msg>,
    counters: Arc<Counters>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl DecisionLog {
    /// Opens (appends to) the log file and starts the writer thread.
    pub fn open(config: LogConfig) -> std::io::Result<DecisionLog> {
        let file = open_append(&config.path)?;
        let (tx, rx) = sync_channel(config.queue.max(1));
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let writer = std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || write_loop(rx, file, config, c))?;
        Ok(DecisionLog {
            tx,
            counters,
            writer: Arc::new(Mutex::new(Some(writer))),
        })
    }

    /// Offers a record to the writer; drops it (and counts) when the writer
    /// is behind. Never blocks.
    pub fn offer(&self, record: Record) {
        match self.tx.try_send(Msg::Record(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    /// Writes what is queued, flushes and stops the writer (at shutdown).
    pub fn close(&self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(handle) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = handle.join();
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

fn write_loop(rx: Receiver<Msg>, file: File, config: LogConfig, counters: Arc<Counters>) {
    let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut out = BufWriter::with_capacity(1 << 16, file);
    let mut line = Vec::with_capacity(1024);
    loop {
        let msg = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(msg) => msg,
            Err(RecvTimeoutError::Timeout) => {
                let _ = out.flush();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => Msg::Stop,
        };
        let record = match msg {
            Msg::Record(r) => r,
            Msg::Stop => break,
        };
        line.clear();
        if serde_json::to_writer(&mut line, &record).is_err() {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        line.push(b'\n');
        if out.write_all(&line).is_err() {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        counters.written.fetch_add(1, Ordering::Relaxed);
        size += line.len() as u64;
        if size >= config.max_bytes {
            let _ = out.flush();
            match rotate(&config) {
                Ok(file) => {
                    out = BufWriter::with_capacity(1 << 16, file);
                    size = 0;
                }
                Err(e) => tracing::error!(error = %e, "decision log rotation failed"),
            }
        }
    }
    let _ = out.flush();
}

/// FILE.(keep-1) -> FILE.keep, ..., FILE -> FILE.1; a fresh FILE.
fn rotate(config: &LogConfig) -> std::io::Result<File> {
    let numbered = |n: usize| PathBuf::from(format!("{}.{n}", config.path.display()));
    for n in (1..config.keep.max(1)).rev() {
        let from = numbered(n);
        if from.exists() {
            std::fs::rename(&from, numbered(n + 1))?;
        }
    }
    std::fs::rename(&config.path, numbered(1))?;
    open_append(&config.path)
}

/// Reads a log file, skipping (and counting) lines that do not parse.
///
/// Bytes, line by line, not the file as one string: the writer flushes in
/// blocks, so a crash can leave the last line cut inside a multi-byte
/// character, and that one line, not the whole file, is then unreadable.
pub fn read(path: &Path) -> std::io::Result<(Vec<Record>, usize)> {
    let bytes = std::fs::read(path)?;
    let mut records = Vec::new();
    let mut bad = 0;
    let lines = bytes.split(|&b| b == b'\n');
    for line in lines.filter(|l| !l.trim_ascii().is_empty()) {
        match serde_json::from_slice(line) {
            Ok(r) => records.push(r),
            Err(_) => bad += 1,
        }
    }
    Ok((records, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(n: usize) -> Record {
        Record::Login(LoginRecord {
            event_id: format!("e{n}"),
            user_id: "u".repeat(200),
            succeeded: true,
            ip: String::new(),
            device_id: String::new(),
            timestamp_ms: n as i64,
        })
    }

    /// A crash can cut the last line inside a multi-byte character: that
    /// line is unreadable, the rest of the file is read.
    #[test]
    fn a_line_cut_inside_a_character_costs_only_that_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let mut bytes = Vec::new();
        for n in 0..2 {
            bytes.extend(serde_json::to_vec(&login(n)).unwrap());
            bytes.push(b'\n');
        }
        let mut cut = serde_json::to_vec(&Record::Login(LoginRecord {
            user_id: "用户".into(),
            ..match login(2) {
                Record::Login(l) => l,
                _ => unreachable!(),
            }
        }))
        .unwrap();
        let at = cut.windows(3).position(|w| w == "用".as_bytes()).unwrap();
        cut.truncate(at + 1);
        bytes.extend(cut);
        std::fs::write(&path, bytes).unwrap();
        let (records, bad) = read(&path).unwrap();
        assert_eq!((records.len(), bad), (2, 1));
    }

    #[test]
    fn writes_lines_and_rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let log = DecisionLog::open(LogConfig {
            path: path.clone(),
            max_bytes: 10_000,
            keep: 2,
            queue: 100_000,
        })
        .unwrap();
        for n in 0..200 {
            log.offer(login(n));
        }
        log.close();
        assert_eq!(log.written(), 200);
        let (now, bad) = read(&path).unwrap();
        let (one, _) = read(&dir.path().join("decisions.jsonl.1")).unwrap();
        let (two, _) = read(&dir.path().join("decisions.jsonl.2")).unwrap();
        assert_eq!(bad, 0);
        assert!(!dir.path().join("decisions.jsonl.3").exists());
        // The newest records are in FILE, the ones before in FILE.1.
        assert_eq!(now.last().unwrap().timestamp_ms(), 199);
        assert_eq!(
            one.last().unwrap().timestamp_ms() + 1,
            now[0].timestamp_ms()
        );
        assert_eq!(
            two.last().unwrap().timestamp_ms() + 1,
            one[0].timestamp_ms()
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open(LogConfig {
            path: dir.path().join("d.jsonl"),
            max_bytes: u64::MAX,
            keep: 1,
            queue: 1,
        })
        .unwrap();
        for n in 0..10_000 {
            log.offer(login(n));
        }
        log.close();
        assert!(log.dropped() > 0);
        assert_eq!(log.dropped() + log.written(), 10_000);
    }
}
