//! Memory per tracked key: fills an in-process engine with the shipped pack
//! and N active users, then reports resident memory and bytes per key.
//!
//! ```sh
//! cargo run --release --example memory -- 1000000
//! ```
//!
//! Each user makes two recharges (its own device, target and a home address
//! among 65,536), so every user-keyed window, profile, device window and
//! duplicate window holds state, as for a real active user. Idempotency
//! records are reported separately: they scale with requests, not users.

use std::sync::Arc;

use riskgate::api::validate;
use riskgate::engine::Engine;
use riskgate::pack::Pack;
use riskgate::pb;
use riskgate::state::memory::MemoryLimits;
use riskgate::state::{MemoryStore, Store};

/// The server's allocator (see `src/main.rs`): resident memory depends on it.
#[global_allocator]
static ALLOC: riskgate_alloc::MiMalloc = riskgate_alloc::MiMalloc;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    // As `riskgate serve` without a pretouch: no transparent huge pages.
    if let Err(e) = riskgate::runtime::huge_pages(false) {
        eprintln!("cannot refuse transparent huge pages: {e}");
    }
    let users: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let pack = Pack::load(&dir.join("rules")).expect("shipped pack");
    let geo = riskgate::server::open_geo(Some(&dir.join("geo/demo.csv"))).expect("geo");
    // Caps as an operator would set them for this population: room for
    // every key (about 2.07 a user) and record (2 a user) with about half
    // as many again to spare, so nothing is evicted.
    let limits = MemoryLimits {
        max_tracked_keys: users * 3,
        max_idempotency_records: std::env::var("IDEM_CAP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(users * 3),
        ..MemoryLimits::default()
    };
    let store = Arc::new(MemoryStore::new(limits));
    let engine = Engine::new(Arc::new(pack), Store::Memory(store.clone()), geo, None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let before = rss_bytes();
    let now = riskgate::now_ms();
    let started = std::time::Instant::now();
    rt.block_on(async {
        for round in 0..2 {
            for u in 0..users {
                let req = pb::EvaluateRequest {
                    request_id: format!("r{round}-{u}"),
                    user_id: format!("user-{u:08}"),
                    amount: 3000 + (u % 50) as i64 * 100,
                    currency: String::new(),
                    channel: "wechat".into(),
                    product: "phone_credit".into(),
                    target: format!("1380{u:07}"),
                    ip: format!("2001:db8::{:x}", u % 65_536),
                    device_id: format!("dev-{u:08}"),
                    timestamp_ms: now - 3_600_000 + round * 60_000,
                    account: Some(pb::Account {
                        real_name_verified: true,
                        status: pb::AccountStatus::Active as i32,
                        created_at_ms: now - 400 * 86_400_000,
                        has_purchase_history: true,
                    }),
                    attributes: Default::default(),
                    dry_run: false,
                };
                let recharge = validate::recharge(req, now).expect("valid");
                engine.evaluate(recharge).await.expect("decided");
            }
        }
    });
    let elapsed = started.elapsed();
    let stats = store.stats();
    let with_requests = rss_bytes();
    println!("users                 {users}");
    println!(
        "decisions             {} in {:.1} s",
        2 * users,
        elapsed.as_secs_f64()
    );
    println!("window keys           {}", stats.window_keys);
    println!("profiles              {}", stats.profiles);
    println!("idempotency records   {}", stats.idempotency_records);
    println!("resident before       {:.1} MiB", before as f64 / 1048576.0);
    println!(
        "resident after        {:.1} MiB",
        with_requests as f64 / 1048576.0
    );
    let grown = with_requests.saturating_sub(before) as f64;
    println!(
        "per user              {:.0} bytes (windows, profile and 2 idempotency records)",
        grown / users as f64
    );
    println!(
        "per tracked key       {:.0} bytes (window keys + profiles + idempotency records)",
        grown / (stats.window_keys + stats.profiles + stats.idempotency_records) as f64
    );
}
