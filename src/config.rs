//! Server configuration: a TOML file (`--config`), overridden by flags and
//! environment variables. Every field has a default, so no file is needed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::pack::manifest::parse_span;
use crate::state::memory::MemoryLimits;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the RiskEngine gRPC service (with health and reflection) listens on.
    pub listen: SocketAddr,
    /// The rule pack folder.
    pub rules: PathBuf,
    /// IP location database: a `.mmdb` (GeoLite2/GeoIP2 City, or the flat
    /// ip-location-db schema) or a CSV `network,country,region,city,latitude,longitude`.
    /// Unset: `geo/demo.csv` if present, else the same demo data built in.
    pub geo: Option<PathBuf>,
    /// Most window keys tracked at once (a user's profile lives in the user's
    /// key); the least recently used are evicted past it.
    pub max_tracked_keys: usize,
    /// Most idempotency records (decided request ids) kept at once.
    pub max_idempotency_records: usize,
    /// How long a decision is kept for retries and outcomes, e.g. "24h".
    pub idempotency_ttl: String,
    /// How often idle keys and expired records are swept, e.g. "30s".
    pub sweep_interval: String,
    /// Address of the RuleAdmin service; unset: no admin service.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token the admin service requires. Required when `admin_listen`
    /// is not a loopback address.
    pub admin_token: Option<String>,
    /// Reload the pack when its folder changes.
    pub watch_rules: bool,
    /// How often the pack folder is checked for changes, e.g. "1s".
    pub watch_interval: String,
    /// Write every decision, login and outcome as JSON lines to this file.
    pub decision_log: Option<PathBuf>,
    /// Rotate the decision log past this many bytes.
    pub decision_log_max_bytes: u64,
    /// Rotated decision log files kept (FILE.1 ... FILE.N).
    pub decision_log_keep: usize,
    /// Records that may wait for the log writer before new ones are dropped.
    pub decision_log_queue: usize,
    /// Where windows, profiles and idempotency records live: `memory` (this
    /// process only) or `redis://host:port/db` (shared by every instance
    /// pointed at it; `rediss://` for TLS is not built in).
    pub state: String,
    /// How long one request may wait for shared state (Redis) before the
    /// pack's `on_state_unavailable` decides without it, e.g. "5ms".
    pub state_timeout: String,
    /// Prefix of every Redis key; it is also the Redis Cluster hash tag, so
    /// that one request's keys share one slot. Instances that share windows
    /// must share the prefix.
    pub redis_prefix: String,
    /// In-memory state only: a snapshot file written every
    /// `snapshot_interval` and at shutdown, and loaded at start; unset: none.
    pub snapshot: Option<PathBuf>,
    /// How often the snapshot is written, e.g. "60s". A kill -9 loses at
    /// most this much of the fraud memory.
    pub snapshot_interval: String,
    /// Start empty when the snapshot is corrupt or from an incompatible
    /// version, instead of refusing to start.
    pub discard_bad_snapshot: bool,
    /// Memory faulted in before serving and kept, e.g. "1GiB"; "0" (the
    /// default) is off. A store that grows into fresh memory takes a page
    /// fault every few requests on the core that serves them, and in a
    /// virtual machine a fault can cost the host's too: faulted in at the
    /// start instead, the store grows into memory that is already there.
    /// The process holds at least this much from the start (its freed
    /// memory is kept, not given back), so size it to the store's working
    /// size (see "Sizing memory" in the README).
    pub pretouch: String,
}

impl Default for Config {
    fn default() -> Self {
        let limits = MemoryLimits::default();
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            rules: PathBuf::from("rules"),
            geo: None,
            max_tracked_keys: limits.max_tracked_keys,
            max_idempotency_records: limits.max_idempotency_records,
            idempotency_ttl: "24h".to_string(),
            sweep_interval: "30s".to_string(),
            admin_listen: None,
            admin_token: None,
            watch_rules: true,
            watch_interval: "1s".to_string(),
            decision_log: None,
            decision_log_max_bytes: 256 << 20,
            decision_log_keep: 5,
            decision_log_queue: 65_536,
            state: "memory".to_string(),
            state_timeout: "5ms".to_string(),
            redis_prefix: "riskgate".to_string(),
            snapshot: None,
            snapshot_interval: "60s".to_string(),
            discard_bad_snapshot: false,
            pretouch: "0".to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {field} `{value}` is not a duration from 1ms to 3650d, like 30s, 10m, 24h (a bare number is seconds)")]
    Duration { field: &'static str, value: String },
    #[error("config: {field} `{value}` is too short: at least {min}")]
    TooShort {
        field: &'static str,
        value: String,
        min: &'static str,
    },
    #[error("config: admin_token is empty: give it a value, or leave it unset")]
    EmptyAdminToken,
    #[error("config: decision_log_keep must be at least 1 (rotated files kept)")]
    NoLogKept,
    #[error("config: admin_listen {0} is not a loopback address: set admin_token to expose it")]
    OpenAdmin(SocketAddr),
    #[error("config: state `{0}` is neither `memory` nor a redis://host:port/db URL")]
    State(String),
    #[error("config: redis_prefix `{0}` must be non-empty and free of `{{`, `}}` and spaces")]
    RedisPrefix(String),
    #[error("config: a snapshot is for the in-memory store; with state = `{0}` the shared store keeps state")]
    SnapshotWithRedis(String),
    #[error("config: {field} `{value}` is not a size up to 1TiB, like 0, 512MiB, 2GiB (a bare number is bytes)")]
    Size { field: &'static str, value: String },
}

/// Where state lives, from [`Config::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateBackend {
    Memory,
    Redis(String),
}

impl Config {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    pub fn memory_limits(&self) -> Result<MemoryLimits, ConfigError> {
        Ok(MemoryLimits {
            max_tracked_keys: self.max_tracked_keys,
            max_idempotency_records: self.max_idempotency_records,
            idempotency_ttl_ms: duration("idempotency_ttl", &self.idempotency_ttl)?,
        })
    }

    /// Checks every setting at once, before anything starts: a typo in the
    /// knob of a feature that is off is still found, and nothing (a snapshot
    /// moved aside, a port bound) happens before a bad setting is refused.
    pub fn check(&self) -> Result<StateBackend, ConfigError> {
        self.check_admin()?;
        self.memory_limits()?;
        self.state_timeout_ms()?;
        self.sweep_interval_ms()?;
        self.watch_interval_ms()?;
        self.snapshot_interval_ms()?;
        if self.decision_log_keep == 0 {
            return Err(ConfigError::NoLogKept);
        }
        self.pretouch_bytes()?;
        self.state_backend()
    }

    /// Bytes to fault in before serving (0: none).
    pub fn pretouch_bytes(&self) -> Result<u64, ConfigError> {
        parse_size(&self.pretouch).ok_or_else(|| ConfigError::Size {
            field: "pretouch",
            value: self.pretouch.clone(),
        })
    }

    /// At least a second: every sweep walks every key.
    pub fn sweep_interval_ms(&self) -> Result<i64, ConfigError> {
        interval("sweep_interval", &self.sweep_interval, (1_000, "1s"))
    }

    pub fn state_timeout_ms(&self) -> Result<i64, ConfigError> {
        duration("state_timeout", &self.state_timeout)
    }

    /// At least a second: every snapshot writes the whole store.
    pub fn snapshot_interval_ms(&self) -> Result<i64, ConfigError> {
        interval("snapshot_interval", &self.snapshot_interval, (1_000, "1s"))
    }

    /// The state backend, checked against the rest of the config.
    pub fn state_backend(&self) -> Result<StateBackend, ConfigError> {
        let state = self.state.trim();
        let backend = if state == "memory" {
            StateBackend::Memory
        } else if state.starts_with("redis://") {
            StateBackend::Redis(state.to_string())
        } else {
            return Err(ConfigError::State(self.state.clone()));
        };
        let prefix = &self.redis_prefix;
        if prefix.is_empty() || prefix.contains(['{', '}', ' ']) {
            return Err(ConfigError::RedisPrefix(prefix.clone()));
        }
        if backend != StateBackend::Memory && self.snapshot.is_some() {
            return Err(ConfigError::SnapshotWithRedis(self.state.clone()));
        }
        Ok(backend)
    }

    /// At least 100 ms: every look reads the pack folder.
    pub fn watch_interval_ms(&self) -> Result<i64, ConfigError> {
        interval("watch_interval", &self.watch_interval, (100, "100ms"))
    }

    /// Refuses an admin service on a public interface without a token, and
    /// an empty token anywhere (an unset variable in `--admin-token "$T"`):
    /// it would pass for a token, and match an empty bearer.
    pub fn check_admin(&self) -> Result<(), ConfigError> {
        if self
            .admin_token
            .as_ref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(ConfigError::EmptyAdminToken);
        }
        match self.admin_listen {
            Some(addr) if !addr.ip().is_loopback() && self.admin_token.is_none() => {
                Err(ConfigError::OpenAdmin(addr))
            }
            _ => Ok(()),
        }
    }

    pub fn log_config(&self) -> Option<crate::decision_log::LogConfig> {
        self.decision_log
            .as_ref()
            .map(|path| crate::decision_log::LogConfig {
                path: path.clone(),
                max_bytes: self.decision_log_max_bytes,
                keep: self.decision_log_keep,
                queue: self.decision_log_queue,
            })
    }
}

/// A duration of at least `min` (ms, and as written in the error).
fn interval(
    field: &'static str,
    value: &str,
    (min_ms, min): (i64, &'static str),
) -> Result<i64, ConfigError> {
    match duration(field, value)? {
        ms if ms < min_ms => Err(ConfigError::TooShort {
            field,
            value: value.to_string(),
            min,
        }),
        ms => Ok(ms),
    }
}

/// A size in bytes: a number and an optional unit (`B`, `KiB`, `MiB`,
/// `GiB`, `TiB`, any case), at most 1 TiB.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "kib" => 10,
        "mib" => 20,
        "gib" => 30,
        "tib" => 40,
        _ => return None,
    };
    let bytes = number.parse::<u64>().ok()?.checked_mul(1 << shift)?;
    (bytes <= 1 << 40).then_some(bytes)
}

fn duration(field: &'static str, value: &str) -> Result<i64, ConfigError> {
    parse_span(value).ok_or_else(|| ConfigError::Duration {
        field,
        value: value.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_the_defaults() {
        let example: Config = toml::from_str(include_str!("../riskgate.example.toml")).unwrap();
        let defaults = Config::default();
        assert_eq!(example.listen, defaults.listen);
        assert_eq!(example.rules, defaults.rules);
        assert_eq!(example.max_tracked_keys, defaults.max_tracked_keys);
        assert_eq!(
            example.memory_limits().unwrap().idempotency_ttl_ms,
            86_400_000
        );
        assert_eq!(example.sweep_interval_ms().unwrap(), 30_000);
        assert_eq!(example.watch_rules, defaults.watch_rules);
        assert_eq!(example.watch_interval, defaults.watch_interval);
        assert_eq!(
            example.decision_log_max_bytes,
            defaults.decision_log_max_bytes
        );
        assert_eq!(example.decision_log_keep, defaults.decision_log_keep);
        assert_eq!(example.decision_log_queue, defaults.decision_log_queue);
        assert_eq!(example.state_backend().unwrap(), StateBackend::Memory);
        assert_eq!(example.state_timeout_ms().unwrap(), 5);
        assert_eq!(example.redis_prefix, defaults.redis_prefix);
        assert_eq!(example.snapshot, defaults.snapshot);
        assert_eq!(example.snapshot_interval_ms().unwrap(), 60_000);
        assert_eq!(example.discard_bad_snapshot, defaults.discard_bad_snapshot);
        assert_eq!(example.pretouch_bytes().unwrap(), 0);
    }

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("512MiB", 512 << 20),
            ("2 GiB", 2 << 30),
            ("1gib", 1 << 30),
            ("64kib", 64 << 10),
            ("1TiB", 1 << 40),
            ("7B", 7),
        ] {
            assert_eq!(parse_size(text), Some(bytes), "{text}");
        }
        for text in [
            "",
            "GiB",
            "-1",
            "1.5GiB",
            "1GB",
            "2TiB",
            "99999999999999999999",
        ] {
            assert_eq!(parse_size(text), None, "{text}");
        }
    }

    #[test]
    fn state_backends() {
        let c = |text: &str| toml::from_str::<Config>(text).unwrap();
        assert_eq!(
            c("state = \"redis://127.0.0.1:6379/0\"")
                .state_backend()
                .unwrap(),
            StateBackend::Redis("redis://127.0.0.1:6379/0".into())
        );
        let bad = c("state = \"mysql://x\"").state_backend().unwrap_err();
        assert!(bad.to_string().contains("mysql://x"), "{bad}");
        assert!(c("redis_prefix = \"a{b}\"").state_backend().is_err());
        let both = c("state = \"redis://h/0\"\nsnapshot = \"s.bin\"");
        assert!(both.state_backend().is_err());
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused() {
        assert!(toml::from_str::<Config>("listn = \"x\"").is_err());
        let c: Config = toml::from_str("idempotency_ttl = \"a day\"").unwrap();
        assert!(c
            .memory_limits()
            .unwrap_err()
            .to_string()
            .contains("idempotency_ttl"));
    }

    /// Everything is checked at once, before the start does anything: a
    /// bad knob of a feature that is off too.
    #[test]
    fn check_refuses_any_bad_setting_up_front() {
        let c = |text: &str| toml::from_str::<Config>(text).unwrap();
        assert_eq!(c("").check().unwrap(), StateBackend::Memory);
        for (text, field) in [
            (
                "watch_rules = false\nwatch_interval = \"soon\"",
                "watch_interval",
            ),
            ("snapshot_interval = \"60x\"", "snapshot_interval"),
            ("state_timeout = \"0ms\"", "state_timeout"),
            ("idempotency_ttl = \"9223372036854775s\"", "idempotency_ttl"),
            ("sweep_interval = \"1ms\"", "sweep_interval"),
            ("snapshot_interval = \"500ms\"", "snapshot_interval"),
            ("watch_interval = \"10ms\"", "watch_interval"),
            ("admin_token = \"\"", "admin_token"),
            ("admin_token = \"  \"", "admin_token"),
            ("decision_log_keep = 0", "decision_log_keep"),
            ("pretouch = \"lots\"", "pretouch"),
        ] {
            let err = c(text).check().unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
        let short = c("sweep_interval = \"1ms\"").check().unwrap_err();
        assert!(short.to_string().contains("at least 1s"), "{short}");
        assert!(c("sweep_interval = \"1s\"\nwatch_interval = \"100ms\"")
            .check()
            .is_ok());
        // A token on loopback is fine; none off loopback is not.
        assert!(c("admin_listen = \"127.0.0.1:9\"\nadmin_token = \"t\"")
            .check()
            .is_ok());
        assert!(c("admin_listen = \"0.0.0.0:9\"").check().is_err());
    }
}
