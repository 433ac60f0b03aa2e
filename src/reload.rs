//! Hot reload of the rule pack, from any of three triggers: the folder
//! changing (polled), SIGHUP, and the admin `ReloadRules` call.
//!
//! A new pack is loaded and checked completely, its own scenarios must pass,
//! and only then is it swapped in (one atomic pointer swap). Requests in
//! flight finish on the pack they loaded; window state lives in the store and
//! survives. A pack that fails leaves the old one serving, and says why in the
//! log, in the failure counter and in the admin call's answer.
//!
//! Why poll and not inotify: the pack is a handful of small files, editors
//! and deploy tools replace files in many ways (rename, truncate, symlink
//! swap), and a once-a-second stat of each file costs nothing and sees all of
//! them without another dependency.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::engine::Engine;
use crate::pack::Pack;

/// What one reload did.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub ok: bool,
    pub version: String,
    pub previous_version: String,
    pub errors: Vec<String>,
    pub unchanged: bool,
}

#[derive(Debug, Default, Clone)]
pub struct ReloadStats {
    pub reloads: u64,
    pub failures: u64,
    pub last_error: String,
}

/// Reloads the engine's pack from its folder. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    dir: PathBuf,
    stats: Mutex<ReloadStats>,
    /// One reload at a time: a second trigger waits, then finds the pack
    /// unchanged.
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(engine: Engine, dir: PathBuf) -> Reloader {
        Reloader {
            inner: Arc::new(Inner {
                engine,
                dir,
                stats: Mutex::new(ReloadStats::default()),
                running: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn stats(&self) -> ReloadStats {
        self.inner
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Loads, checks and tests the folder's pack, and swaps it in if it passes.
    pub async fn reload(&self, trigger: &str) -> Reloaded {
        let _one = self.inner.running.lock().await;
        let engine = &self.inner.engine;
        let previous = engine.pack();
        let dir = self.inner.dir.clone();
        let loaded = tokio::task::spawn_blocking(move || Pack::load(&dir)).await;
        let mut result = Reloaded {
            ok: false,
            version: previous.version.to_string(),
            previous_version: previous.version.to_string(),
            errors: Vec::new(),
            unchanged: false,
        };
        match loaded {
            Err(e) => result
                .errors
                .push(format!("loading the pack panicked: {e}")),
            Ok(Err(e)) => result.errors = e.problems.iter().map(ToString::to_string).collect(),
            Ok(Ok(pack)) if pack.version == previous.version => {
                result.ok = true;
                result.unchanged = true;
            }
            Ok(Ok(pack)) => {
                let pack = Arc::new(pack);
                let outcomes = crate::scenario::run_all(&pack, engine.geo()).await;
                for o in outcomes.iter().filter(|o| !o.passed()) {
                    let file = o
                        .file
                        .file_name()
                        .map(|f| f.to_string_lossy())
                        .unwrap_or_default();
                    for f in &o.failures {
                        result
                            .errors
                            .push(format!("scenario tests/{file} ({}): {f}", o.name));
                    }
                }
                if result.errors.is_empty() {
                    result.version = pack.version.to_string();
                    engine.swap_pack(pack);
                    result.ok = true;
                }
            }
        }
        let mut stats = self.inner.stats.lock().unwrap_or_else(|e| e.into_inner());
        if result.unchanged {
            tracing::info!(trigger, version = %result.version, "rule pack unchanged");
        } else if result.ok {
            stats.reloads += 1;
            stats.last_error.clear();
            tracing::info!(trigger, from = %result.previous_version, to = %result.version, "rule pack reloaded");
        } else if !result.ok {
            stats.failures += 1;
            stats.last_error = result.errors.join("\n");
            tracing::error!(
                trigger,
                serving = %result.version,
                errors = %stats.last_error,
                "rule pack refused; the old pack keeps serving"
            );
        }
        result
    }

    /// Reloads whenever the folder's contents change, checking every `every`.
    /// A change is acted on once it has held still for one more tick, so a
    /// copy in progress is not loaded half-way.
    pub fn spawn_watch(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut seen = fingerprint(this.dir());
            let mut pending: Option<u64> = None;
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let dir = this.dir().to_path_buf();
                let now = tokio::task::spawn_blocking(move || fingerprint(&dir))
                    .await
                    .unwrap_or(seen);
                if now == seen {
                    pending = None;
                    continue;
                }
                if pending != Some(now) {
                    pending = Some(now);
                    continue;
                }
                seen = now;
                pending = None;
                this.reload("watch").await;
            }
        })
    }

    /// Reloads on SIGHUP.
    #[cfg(unix)]
    pub fn spawn_sighup(&self) -> Option<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).ok()?;
        let this = self.clone();
        Some(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                this.reload("sighup").await;
            }
        }))
    }
}

/// A hash of every file's path, size and modification time under `dir`.
fn fingerprint(dir: &Path) -> u64 {
    let mut entries = Vec::new();
    collect(dir, &mut entries, 0);
    entries.sort();
    let parts: Vec<&[u8]> = entries.iter().map(|e| e.as_bytes()).collect();
    crate::state::fnv1a(&parts)
}

fn collect(dir: &Path, out: &mut Vec<String>, depth: usize) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in read.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if depth < 4 {
                collect(&path, out, depth + 1);
            }
            continue;
        }
        let modified = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        out.push(format!("{}|{}|{modified}", path.display(), meta.len()));
    }
}
