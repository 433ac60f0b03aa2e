//! Wiring: a [`Config`] becomes an [`Engine`] with its store, pack and geo
//! database, served until shutdown, with the background sweeper running.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ConfigError, StateBackend};
use crate::decision_log::DecisionLog;
use crate::engine::Engine;
use crate::geo::{GeoDb, GeoError};
use crate::housekeeping::Housekeeper;
use crate::pack::{LoadError, Pack};
use crate::reload::Reloader;
use crate::state::redis::RedisConfig;
use crate::state::snapshot::{SnapshotError, SnapshotStats};
use crate::state::{MemoryStore, RedisStore, StateError, Store};

/// The demo location data, built in so the server runs from any directory.
pub const DEMO_GEO: &str = include_str!("../geo/demo.csv");

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pack(#[from] LoadError),
    #[error(transparent)]
    Geo(#[from] GeoError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("cannot open the decision log: {0}")]
    Log(std::io::Error),
    #[error("{}", snapshot_message(.0))]
    Snapshot(SnapshotError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot start a housekeeping thread: {0}")]
    Housekeeping(std::io::Error),
    #[error("cannot move the refused snapshot aside to {}: {source}; it stays where it is, and the server does not start", to.display())]
    MoveAside { to: PathBuf, source: std::io::Error },
}

/// A bad snapshot's error says what to do about it.
fn snapshot_message(e: &SnapshotError) -> String {
    if e.is_bad_file() {
        format!("{e}; fix or remove it, or start with --discard-bad-snapshot to start empty")
    } else {
        e.to_string()
    }
}

/// Opens the configured geo database, or the demo data.
pub fn open_geo(path: Option<&Path>) -> Result<GeoDb, GeoError> {
    match path {
        Some(p) => GeoDb::open(p),
        None if Path::new("geo/demo.csv").is_file() => GeoDb::open(Path::new("geo/demo.csv")),
        None => GeoDb::from_csv(DEMO_GEO, "geo/demo.csv (built in)"),
    }
}

/// Builds the engine a config describes.
pub async fn build(config: &Config) -> Result<Engine, StartError> {
    let backend = config.check()?;
    let pack = Pack::load(&config.rules)?;
    let geo = open_geo(config.geo.as_deref())?;
    let store = match backend {
        StateBackend::Memory => Store::Memory(open_memory(config)?),
        StateBackend::Redis(url) => {
            let redis = RedisConfig {
                url,
                prefix: config.redis_prefix.clone(),
                timeout_ms: config.state_timeout_ms()?,
                idempotency_ttl_ms: config.memory_limits()?.idempotency_ttl_ms,
                inline_settle: false,
            };
            Store::Redis(Arc::new(RedisStore::connect(redis).await?))
        }
    };
    let log = config
        .log_config()
        .map(DecisionLog::open)
        .transpose()
        .map_err(StartError::Log)?;
    tracing::info!(
        pack = %pack.dir.display(),
        version = %pack.version,
        rules = pack.rules.len(),
        windows = pack.plan.windows.len(),
        geo = %geo.describe(),
        state = %store.describe(),
        "rule pack loaded"
    );
    Ok(Engine::new(Arc::new(pack), store, geo, log))
}

/// The in-memory store, with the snapshot loaded when one is configured and
/// its file exists. A bad snapshot refuses the start, unless
/// `discard_bad_snapshot`: then it is moved aside to `FILE.bad` (never
/// overwritten by the next write) and the store starts empty. Starting
/// empty writes an empty snapshot at once, so an unwritable path fails the
/// start.
pub fn open_memory(config: &Config) -> Result<Arc<MemoryStore>, StartError> {
    let limits = config.memory_limits()?;
    let store = MemoryStore::new(limits.clone());
    let Some(path) = &config.snapshot else {
        return Ok(Arc::new(store));
    };
    match store.load_snapshot(path) {
        Ok(stats) => {
            log_snapshot("snapshot loaded", path, &stats);
            Ok(Arc::new(store))
        }
        Err(e) if e.is_missing() => {
            // An empty snapshot at once: a path that cannot be written is
            // found now, not at the first interval.
            store.save_snapshot(path).map_err(StartError::Snapshot)?;
            tracing::info!(path = %path.display(), "no snapshot yet: starting empty");
            Ok(Arc::new(store))
        }
        Err(e) if e.is_bad_file() && config.discard_bad_snapshot => {
            let mut aside = path.as_os_str().to_os_string();
            aside.push(".bad");
            let aside = PathBuf::from(aside);
            // The refused file is kept: if it cannot be moved aside, the
            // empty snapshot written below would replace it, so no start.
            std::fs::rename(path, &aside).map_err(|source| StartError::MoveAside {
                to: aside.clone(),
                source,
            })?;
            tracing::warn!(
                error = %e,
                moved_to = %aside.display(),
                "SNAPSHOT DISCARDED (--discard-bad-snapshot): starting with EMPTY windows, \
                 profiles and idempotency records"
            );
            // A fresh store: nothing of the refused file stays.
            let store = MemoryStore::new(limits);
            store.save_snapshot(path).map_err(StartError::Snapshot)?;
            Ok(Arc::new(store))
        }
        Err(e) => Err(StartError::Snapshot(e)),
    }
}

fn log_snapshot(what: &str, path: &Path, stats: &SnapshotStats) {
    tracing::info!(
        path = %path.display(),
        window_keys = stats.window_keys,
        profiles = stats.profiles,
        idempotency_records = stats.idempotency_records,
        bytes = stats.bytes,
        ms = stats.millis,
        evicted = stats.evicted,
        "{what}"
    );
}

/// Writes the snapshot off the request workers; logs and returns the outcome.
async fn save_snapshot(store: Arc<MemoryStore>, path: PathBuf) -> Result<(), SnapshotError> {
    let to = path.clone();
    let saved = tokio::task::spawn_blocking(move || store.save_snapshot(&to))
        .await
        .unwrap_or_else(|e| {
            Err(SnapshotError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })
        });
    match &saved {
        Ok(stats) => log_snapshot("snapshot written", &path, stats),
        Err(e) => tracing::error!(error = %e, "snapshot not written; the previous one stays"),
    }
    saved.map(|_| ())
}

/// Writes the snapshot every `every`, until aborted.
pub fn spawn_snapshots(
    store: Arc<MemoryStore>,
    path: PathBuf,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let _ = save_snapshot(store.clone(), path.clone()).await;
        }
    })
}

/// Sweeps idle keys and expired records every `every`, until the engine goes.
pub fn spawn_sweeper(
    engine: &Engine,
    every: Duration,
    keeper: Housekeeper,
) -> tokio::task::JoinHandle<()> {
    let engine = engine.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        // A sweep that ran long (it runs at the lowest priority, so on a
        // busy machine it does) is not followed by the missed ones at once.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let span = engine.pack().plan.profile_span_ms;
            let e = engine.clone();
            // The sweep walks every key: off the request workers, at the
            // lowest priority (see [`crate::housekeeping`]).
            keeper
                .run(move || e.store().expire(crate::now_ms(), span))
                .await;
            tracing::debug!(stats = ?engine.store().stats(), "swept");
        }
    })
}

/// Runs the server until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    // SIGHUP's default action ends the process: take it over before the
    // start, which can take seconds (a large snapshot). One sent meanwhile
    // is dropped; the start loads the pack as it is anyway.
    #[cfg(unix)]
    let early_hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let engine = build(&config).await?;
    let listen = |addr| async move {
        crate::api::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })
    };
    let listener = listen(config.listen).await?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    let keeper = |name| Housekeeper::start(name).map_err(StartError::Housekeeping);
    let sweeper = spawn_sweeper(
        &engine,
        Duration::from_millis(config.sweep_interval_ms()? as u64),
        keeper("rg-sweep")?,
    );

    let reloader = Reloader::new(engine.clone(), config.rules.clone());
    let mut background = vec![sweeper];
    if config.watch_rules {
        let every = Duration::from_millis(config.watch_interval_ms()? as u64);
        background.push(reloader.spawn_watch(every));
    }
    #[cfg(unix)]
    {
        background.extend(reloader.spawn_sighup());
        drop(early_hup);
    }
    // The in-memory store's snapshot: every interval, and once more at the end.
    let snapshots = match (engine.store(), &config.snapshot) {
        (Store::Memory(m), Some(path)) => Some((m.clone(), path.clone())),
        _ => None,
    };
    if let Some((store, path)) = &snapshots {
        let every = Duration::from_millis(config.snapshot_interval_ms()? as u64);
        background.push(spawn_snapshots(store.clone(), path.clone(), every));
    }

    // Both listeners stop on the one shutdown signal.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let admin = match config.admin_listen {
        Some(admin_addr) => {
            let admin_listener = listen(admin_addr).await?;
            let admin_addr = admin_listener.local_addr().unwrap_or(admin_addr);
            tracing::info!(addr = %admin_addr, token = config.admin_token.is_some(), "RuleAdmin serving");
            let api = crate::api::admin::AdminApi::new(engine.clone(), reloader.clone());
            Some(tokio::spawn(crate::api::serve_admin(
                api,
                config.admin_token.clone(),
                admin_listener,
                stopped(),
            )))
        }
        None => None,
    };

    tracing::info!(%addr, "riskgate serving RiskEngine (health, reflection on)");
    let serve = crate::api::serve(engine.clone(), listener, stopped());
    tokio::pin!(serve);
    let served = tokio::select! {
        served = &mut serve => served,
        _ = shutdown => {
            let _ = stop_tx.send(true);
            serve.await
        }
    };
    // However serving ended, the admin listener ends with it.
    let _ = stop_tx.send(true);
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    let unsettled = engine.finish_settles(Duration::from_secs(5)).await;
    if unsettled > 0 {
        tracing::error!(
            unsettled,
            "stopped with settles of shared state still in flight"
        );
    }
    for task in background {
        task.abort();
    }
    if let Some(log) = engine.decision_log() {
        log.close();
        tracing::info!(
            written = log.written(),
            dropped = log.dropped(),
            "decision log closed"
        );
    }
    // Serving has stopped: the final snapshot holds every decision made.
    let saved = match snapshots {
        Some((store, path)) => save_snapshot(store, path)
            .await
            .map_err(StartError::Snapshot),
        None => Ok(()),
    };
    tracing::info!("riskgate stopped");
    served?;
    saved
}

/// Runs the baseline server (`serve --baseline`): no rules, no state.
pub async fn run_baseline(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let listener = crate::api::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    let ignored: Vec<&str> = [
        (config.state.trim() != "memory", "state"),
        (config.snapshot.is_some(), "snapshot"),
        (config.admin_listen.is_some(), "admin_listen"),
        (config.decision_log.is_some(), "decision_log"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    if !ignored.is_empty() {
        tracing::warn!(
            ignored = ?ignored,
            "--baseline keeps no state, logs nothing and serves no admin API: these settings have no effect"
        );
    }
    tracing::info!(%addr, "riskgate BASELINE serving: every Evaluate is ALLOW, no rules, no state");
    crate::api::serve_baseline(listener, shutdown).await?;
    tracing::info!("riskgate stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is
/// called (inside a runtime), not when first polled, so a signal that comes
/// right after start-up still shuts down gracefully.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(term.take()) => {},
                _ = wait(int.take()) => {},
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested; finishing requests in flight");
    }
}
