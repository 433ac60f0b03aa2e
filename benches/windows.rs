//! The window store alone: `MemoryStore::begin` with the shipped pack's
//! `WindowPlan`, recording and reading every window of one request (4 key
//! groups, 9 windows, plus the profile read), and `Series` / `Distinct` alone.
//!
//! ```sh
//! cargo bench --bench windows
//! cargo bench --bench windows -- --quick
//! ```
//!
//! - `window/begin_hot_keys`: 4 users (each with own IP, device, target)
//!   round robin, event time +10 ms a call: the keys stay in cache and every
//!   window has history.
//! - `window/begin_many_keys`: 1,000,000 users (own device and target, IPs
//!   from a pool of 65,536), visited in a scrambled cycle after one untimed
//!   pass that creates their keys (about 3.07 M window keys); cap raised to
//!   8 M keys so nothing is evicted: big-map lookups. The pass runs before
//!   the benchmark (even when a filter leaves it out): about 7 s each.
//! - `window/begin_many_keys_capped`: the same with the default cap of
//!   2,000,000 tracked keys: every visit misses and inserts, and the store
//!   evicts a tenth whenever it goes over the cap (a flood of new keys).
//! - `window/series_add`: `Series::add` on a 10-minute shape, event time
//!   +100 ms a call (a new bucket every 100 adds, the oldest dropped).
//! - `window/distinct_add`: `Distinct::add` on a 1-hour shape over 8 values
//!   (one shared device's users).
//! - `window/distinct_add_4096_live`: the same over 4,096 values, all within
//!   the hour (a shop terminal or a campus address many users share; an
//!   emulator farm reusing one device id): every add finds its value again.
//! - `window/distinct_add_fresh`: a new value on every add, at the
//!   [`MAX_DISTINCT`](riskgate::state::window::MAX_DISTINCT) bound (a device
//!   cycling through made-up user ids): every add forgets the oldest value.
//! - `window/profile_view_full`: `Profile::view` of an active user's profile
//!   (the 32 located events kept, in two regions), as every request of a
//!   known user takes it.

use std::hint::black_box;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use riskgate::geo::{GeoDb, Location};
use riskgate::model::{Account, AccountStatus, Facts, Recharge};
use riskgate::pack::Pack;
use riskgate::state::memory::MemoryLimits;
use riskgate::state::profile::{Profile, RECENT};
use riskgate::state::window::{Distinct, Series, Shape};
use riskgate::state::MemoryStore;

const T0_MS: i64 = 1_767_225_600_000;
const MANY_USERS: u64 = 1_000_000;
const IP_POOL: u64 = 65_536;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A recharge by `user`: own device and target, an address from the pool.
fn recharge(user: u64, ts: i64) -> Recharge {
    let ip = IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        (user % IP_POOL) as u16,
        0,
        0,
        0,
        0,
        1,
    ));
    Recharge {
        request_id: String::new(),
        facts: Facts {
            user_id: format!("u{user}"),
            ip_text: ip.to_string(),
            device_id: format!("d{user}"),
            target: format!("138{user:08}"),
            channel: "wechat".to_string(),
            product: "phone_credit".to_string(),
            currency: "CNY".to_string(),
            amount: [1_000, 5_000, 10_000, 60_000][(user % 4) as usize],
            timestamp_ms: ts,
        },
        ip,
        account: Account {
            real_name_verified: true,
            status: AccountStatus::Active,
            created_at_ms: T0_MS - 400 * 86_400_000,
            has_purchase_history: true,
        },
        attributes: Default::default(),
        dry_run: false,
    }
}

/// Visits every user once, in a scrambled order (a bijection of 0..n).
fn scrambled(i: u64) -> u64 {
    (i % MANY_USERS) * 7_919 % MANY_USERS
}

fn main() {
    let pack = Pack::load(&root().join("rules")).unwrap_or_else(|e| panic!("{e}"));
    let geo = GeoDb::open(&root().join("geo/demo.csv")).unwrap_or_else(|e| panic!("{e}"));
    let plan = &pack.plan;
    let location: Option<Arc<Location>> = geo.lookup(recharge(0, 0).ip);
    let loc = location.as_deref();
    eprintln!(
        "windows: {} windows in {} key groups",
        plan.windows.len(),
        plan.groups.len()
    );

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("window");
    g.throughput(Throughput::Elements(1));

    {
        let store = MemoryStore::new(MemoryLimits::default());
        let mut hot: Vec<Recharge> = (0..4).map(|u| recharge(u, T0_MS)).collect();
        let mut ts = T0_MS;
        g.bench_function("begin_hot_keys", |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for i in 0..iters {
                    ts += 10;
                    let r = &mut hot[(i % 4) as usize];
                    r.facts.timestamp_ms = ts;
                    black_box(store.begin(plan, r, loc, true));
                }
                start.elapsed()
            });
        });
    }

    for (name, cap) in [
        ("begin_many_keys", 8_000_000),
        (
            "begin_many_keys_capped",
            MemoryLimits::default().max_tracked_keys,
        ),
    ] {
        // Filled before the benchmark, not in it: criterion's quick mode
        // counts a first call's wall time, and one pass takes seconds.
        let store = MemoryStore::new(MemoryLimits {
            max_tracked_keys: cap,
            ..MemoryLimits::default()
        });
        let mut ts = T0_MS;
        let started = Instant::now();
        for u in 0..MANY_USERS {
            ts += 1;
            store.begin(plan, &recharge(scrambled(u), ts), loc, true);
        }
        eprintln!(
            "{name}: {} window keys after one pass over {MANY_USERS} users ({:.2?}, {} evicted)",
            store.stats().window_keys,
            started.elapsed(),
            store.stats().evicted
        );
        let mut i = 0u64;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut batch = Vec::with_capacity(256);
                let mut out = Vec::with_capacity(256);
                let mut left = iters;
                while left > 0 {
                    let n = left.min(256);
                    batch.extend((0..n).map(|_| {
                        i += 1;
                        ts += 1;
                        recharge(scrambled(i), ts)
                    }));
                    let start = Instant::now();
                    out.extend(batch.iter().map(|r| store.begin(plan, r, loc, true)));
                    total += start.elapsed();
                    batch.clear();
                    out.clear();
                    left -= n;
                }
                total
            });
        });
    }

    {
        let shape = Shape::new(10 * 60_000);
        let mut series = Series::default();
        let mut ts = T0_MS;
        g.bench_function("series_add", |b| {
            b.iter(|| {
                ts += 100;
                series.add(shape, black_box(ts), 1)
            });
        });
    }

    {
        let shape = Shape::new(3_600_000);
        let mut distinct = Distinct::default();
        let mut ts = T0_MS;
        let mut v = 0u64;
        g.bench_function("distinct_add", |b| {
            b.iter(|| {
                ts += 100;
                v = (v + 1) % 8;
                distinct.add(shape, black_box(ts), 0x9e37_79b9 ^ v)
            });
        });
    }

    for (name, values) in [
        ("distinct_add_4096_live", 4096u64),
        ("distinct_add_fresh", 0),
    ] {
        let shape = Shape::new(3_600_000);
        let mut distinct = Distinct::default();
        let mut ts = T0_MS;
        let mut v = 0u64;
        let mut next = move || {
            ts += 100;
            v += 1;
            // 0: every value new; otherwise a cycle over `values` values.
            (ts, if values == 0 { v } else { v % values })
        };
        // Untimed: fill the key to its steady state first.
        for _ in 0..10_000 {
            let (ts, v) = next();
            distinct.add(shape, ts, v.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        g.bench_function(name, |b| {
            b.iter(|| {
                let (ts, v) = next();
                distinct.add(shape, black_box(ts), v.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            });
        });
    }

    {
        // An active user's profile: RECENT located events, in two regions
        // (home and work), all within the span; the view every request takes.
        let home = Location::new("CN".into(), "Beijing".into(), "Beijing".into(), 39.9, 116.4);
        let work = Location::new("CN".into(), "Hebei".into(), "Langfang".into(), 39.5, 116.7);
        let mut profile = Profile::default();
        for i in 0..RECENT as i64 {
            profile.learn(T0_MS + i * 60_000, if i % 3 == 0 { &work } else { &home });
        }
        let now = T0_MS + 3_600_000;
        g.bench_function("profile_view_full", |b| {
            b.iter(|| profile.view(black_box(now), 30 * 86_400_000, Some(&home)));
        });
    }

    g.finish();
    c.final_summary();
}
