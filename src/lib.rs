//! riskgate: real-time risk control for recharge (top-up) platforms.
//!
//! A platform calls `Evaluate` before it charges. One request flows one way:
//!
//! ```text
//! api (decode, validate) -> engine: features (geo, lists, windows, profile)
//!     -> rules (Rhai, pure) -> decision (combine) -> state (record, remember)
//! ```
//!
//! - [`api`]: the gRPC services; all input checking; errors -> status codes.
//! - [`engine`]: the pipeline for one request.
//! - [`pack`]: a rule pack: manifest, lists, sandboxed Rhai scripts.
//! - [`state`]: sliding windows, user profiles, idempotency records.
//! - [`geo`]: IP -> location.
//! - [`decision`]: how hits combine.
//! - [`server`]: wiring a configured engine to a listener.
//! - [`housekeeping`]: the store's long walks, on a low-priority thread.
//! - [`scenario`]: a pack's own scenario tests (`riskgate test`).
//! - [`reload`]: hot reload (folder watch, SIGHUP, admin call).
//! - [`decision_log`]: JSON lines of every decision, off the hot path.
//! - [`replay`]: backtests a candidate pack on a decision log.
//! - [`runtime`]: the tokio runtime the server runs on (no LIFO slot).
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod decision;
pub mod decision_log;
pub mod engine;
pub mod geo;
pub mod housekeeping;
pub mod loadgen;
pub mod model;
pub mod pack;
pub mod reload;
pub mod replay;
pub mod runtime;
pub mod scenario;
pub mod server;
pub mod state;

/// The generated protobuf types and gRPC stubs of `riskgate.v1`.
#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("riskgate.v1");
    /// The encoded descriptor set, for server reflection.
    pub const DESCRIPTOR: &[u8] = tonic::include_file_descriptor_set!("riskgate_descriptor");
}

/// The server's clock, Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
