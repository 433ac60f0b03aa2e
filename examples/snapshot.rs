//! Snapshot size and write/load time: fills an in-process engine with the
//! shipped pack and N active users (as `examples/memory.rs` does: two
//! recharges each, so every user-keyed window, profile, device window and
//! duplicate window holds state, plus two idempotency records per user),
//! then writes a snapshot and loads it into a fresh store.
//!
//! ```sh
//! cargo run --release --example snapshot -- 1000000 /tmp/riskgate.snap
//! IDEM_CAP=1000 cargo run --release --example snapshot -- 1000000   # windows and profiles
//! ```

use std::sync::Arc;
use std::time::Instant;

use riskgate::api::validate;
use riskgate::engine::Engine;
use riskgate::pack::Pack;
use riskgate::pb;
use riskgate::state::memory::MemoryLimits;
use riskgate::state::{MemoryStore, Store};

fn main() {
    let mut args = std::env::args().skip(1);
    let users: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let path = std::path::PathBuf::from(
        args.next()
            .unwrap_or_else(|| "target/riskgate-example.snap".into()),
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let pack = Pack::load(&dir.join("rules")).expect("shipped pack");
    let geo = riskgate::server::open_geo(Some(&dir.join("geo/demo.csv"))).expect("geo");
    let limits = MemoryLimits {
        max_tracked_keys: users * 8,
        max_idempotency_records: std::env::var("IDEM_CAP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(users * 4),
        ..MemoryLimits::default()
    };
    let store = Arc::new(MemoryStore::new(limits.clone()));
    let engine = Engine::new(Arc::new(pack), Store::Memory(store.clone()), geo, None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let now = riskgate::now_ms();
    let started = Instant::now();
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
    println!("users                 {users}");
    println!(
        "filled in             {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let stats = store.stats();
    println!("window keys           {}", stats.window_keys);
    println!("profiles              {}", stats.profiles);
    println!("idempotency records   {}", stats.idempotency_records);

    let saved = store.save_snapshot(&path).expect("snapshot written");
    println!(
        "written               {:.1} MiB in {} ms ({} records, {:.0} bytes per user)",
        saved.bytes as f64 / 1048576.0,
        saved.millis,
        saved.records(),
        saved.bytes as f64 / users as f64
    );
    drop(engine);
    drop(store);

    let fresh = MemoryStore::new(limits);
    let loaded = fresh.load_snapshot(&path).expect("snapshot loaded");
    println!(
        "loaded                {} records in {} ms (checksum pass included)",
        loaded.records(),
        loaded.millis
    );
    assert_eq!(loaded.records(), saved.records());
    assert!(loaded.evicted == 0 || std::env::var_os("IDEM_CAP").is_some());
}
