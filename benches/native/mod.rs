//! Shared by the decision benchmarks: a deterministic traffic mix, the
//! engine's decision pipeline mirrored through the public API (so no async
//! machinery is measured), and the shipped rules written natively in Rust over
//! the same `Ctx`, for an honest Rhai/native ratio.
//!
//! Nothing here is part of the library: if the shipped pack changes, `check`
//! (run at bench start) says where native and Rhai part ways.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use riskgate::decision::{combine, Action, Decision, Reason};
use riskgate::geo::GeoDb;
use riskgate::model::{Account, AccountStatus, Facts, Login, Outcome, OutcomeKind, Recharge};
use riskgate::pack::manifest::Mode;
use riskgate::pack::script::Ctx;
use riskgate::pack::{Pack, Verdict};
use riskgate::state::memory::{MemoryLimits, OutcomeMark};
use riskgate::state::{fnv1a, releases, KeptDecision, MemoryStore, Settled};

/// Event time of the first generated step: 2026-01-01T00:00:00Z.
pub const T0_MS: i64 = 1_767_225_600_000;
/// Event time between two generated steps: 10 steps per simulated second.
pub const STEP_MS: i64 = 100;
/// The regular user population.
pub const USERS: u64 = 50_000;
const DAY_MS: i64 = 86_400_000;
/// Event time between two sweeps of idle keys (untimed). The server sweeps
/// every 30 s of wall-clock time, which at tens of thousands of decisions a
/// second is one sweep per million decisions; a sweep walks every key and
/// leaves the caches cold, so sweeping every few thousand decisions would
/// charge the decisions after it for it. Once an hour of event time is
/// once per 36,000 steps.
pub const SWEEP_EVERY_MS: i64 = 3_600_000;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped pack, as the server loads it.
pub fn shipped_pack() -> Arc<Pack> {
    let dir = root().join("rules");
    Arc::new(Pack::load(&dir).unwrap_or_else(|e| panic!("{e}")))
}

/// The demo geo table, as the server loads it by default.
pub fn demo_geo() -> GeoDb {
    GeoDb::open(&root().join("geo/demo.csv")).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------

/// SplitMix64 (as in `riskgate loadgen`).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// One thing that happens to the engine.
#[derive(Debug, Clone)]
pub enum Step {
    Recharge(Recharge),
    Login(Login),
    Outcome(Outcome),
}

enum Pending {
    Step(Step),
    /// A regular user's everyday order: remembered for chargebacks.
    Regular(u64, Recharge),
    /// A CHALLENGE_FAILED outcome of the recharge emitted just before.
    FailLast,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Regular,
    NewDevice,
    Duplicate,
    UnverifiedLarge,
    NewAccount,
    AccountState,
    Listed,
    Burst,
    Traveller,
    SharedDevice,
    BotRetry,
    StolenAccount,
    Chargeback,
    ChallengeFailer,
    IpFlood,
}

/// Draw weights per 100,000 draws. Streak kinds emit several steps back to
/// back (a burst, a trip, a flood...), so as a share of steps they weigh more.
const KINDS: [(u64, Kind); 15] = [
    (75_995, Kind::Regular),
    (8_000, Kind::NewDevice),
    (5_000, Kind::Duplicate),
    (5_000, Kind::UnverifiedLarge),
    (3_000, Kind::NewAccount),
    (500, Kind::AccountState),
    (300, Kind::Listed),
    (800, Kind::Burst),          // 6-8 large orders by one user
    (800, Kind::Traveller),      // 3 at home, then 3 in far cities
    (300, Kind::SharedDevice),   // 7 users on one device
    (40, Kind::BotRetry),        // 24 orders by one user on one device
    (100, Kind::StolenAccount),  // 6 failed logins, a new-region login, an order
    (100, Kind::Chargeback),     // a chargeback, then the user orders again
    (60, Kind::ChallengeFailer), // 3 challenged duplicates failed, then an order
    (5, Kind::IpFlood),          // 320 orders from one IPv4 address
];

/// An IPv4 city of `geo/demo.csv`: first three octets, first and last host.
type City = (&'static str, u64, u64);
const BEIJING: City = ("192.0.2", 1, 63);
const SHANGHAI: City = ("192.0.2", 128, 254);
const GUANGZHOU: City = ("198.51.100", 1, 127);
const CHENGDU: City = ("198.51.100", 192, 254);
const HARBIN: City = ("203.0.113", 1, 127);
const URUMQI: City = ("203.0.113", 128, 249);
const TRIPS: [(City, City); 4] = [
    (URUMQI, BEIJING),
    (HARBIN, CHENGDU),
    (URUMQI, SHANGHAI),
    (HARBIN, GUANGZHOU),
];
const FAR: [City; 4] = [URUMQI, HARBIN, CHENGDU, GUANGZHOU];
const CHANNELS: [&str; 5] = ["wechat", "alipay", "unionpay", "app", "web"];
const EVERYDAY_YUAN: [u64; 9] = [10, 20, 30, 50, 50, 100, 100, 200, 300];

/// A regular user's own home address (Hangzhou or Wuhan, IPv6), as loadgen does.
fn home_ip(user: u64) -> IpAddr {
    let high = ((user >> 16) & 0x7fff) as u16 | if user % 2 == 1 { 0x8000 } else { 0 };
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, high, user as u16, 0, 0, 0, 1))
}

fn city_ip(rng: &mut Rng, (net, lo, hi): City) -> IpAddr {
    let host = lo + rng.below(hi - lo + 1);
    let text = format!("{net}.{host}");
    IpAddr::V4(text.parse::<Ipv4Addr>().expect("a documentation address"))
}

fn set_ip(r: &mut Recharge, ip: IpAddr) {
    r.ip = ip;
    r.facts.ip_text = ip.to_string();
}

/// A deterministic, endless stream of recharges, logins and outcomes with
/// event times `STEP_MS` apart and unique request ids.
pub struct Traffic {
    rng: Rng,
    queue: VecDeque<Pending>,
    stash: Option<Step>,
    now: i64,
    seq: u64,
    last_id: String,
    /// The content of the last regular order drawn (duplicates repeat it).
    last_regular: Option<(u64, Recharge)>,
    /// The user and id of the last regular order emitted.
    last_regular_id: Option<(u64, String)>,
    /// Event time of the last sweep of idle keys.
    swept: i64,
}

impl Traffic {
    pub fn new(seed: u64) -> Traffic {
        let mut rng = Rng(seed);
        rng.next_u64();
        Traffic {
            rng,
            queue: VecDeque::new(),
            stash: None,
            now: T0_MS,
            seq: 0,
            last_id: String::new(),
            last_regular: None,
            last_regular_id: None,
            swept: T0_MS,
        }
    }

    /// Recharges handed out so far.
    pub fn recharges(&self) -> u64 {
        self.seq
    }

    /// The event time to sweep idle keys at, every `SWEEP_EVERY_MS` of
    /// event time: part of the stream, so every replay sweeps alike.
    pub fn sweep_due(&mut self) -> Option<i64> {
        if self.now - self.swept >= SWEEP_EVERY_MS {
            self.swept = self.now;
            Some(self.now)
        } else {
            None
        }
    }

    /// The next step. Its time and (for recharges) request id are final.
    pub fn next_step(&mut self) -> Step {
        if let Some(step) = self.stash.take() {
            return step;
        }
        while self.queue.is_empty() {
            self.draw();
        }
        self.now += STEP_MS;
        match self.queue.pop_front().expect("drawn") {
            Pending::Regular(user, r) => {
                let step = self.emit(r);
                if let Step::Recharge(r) = &step {
                    self.last_regular_id = Some((user, r.request_id.clone()));
                }
                step
            }
            Pending::Step(Step::Recharge(r)) => self.emit(r),
            Pending::Step(Step::Login(mut l)) => {
                l.timestamp_ms = self.now;
                Step::Login(l)
            }
            Pending::Step(Step::Outcome(mut o)) => {
                o.timestamp_ms = self.now;
                Step::Outcome(o)
            }
            Pending::FailLast => Step::Outcome(Outcome {
                request_id: self.last_id.clone(),
                user_id: String::new(),
                kind: OutcomeKind::ChallengeFailed,
                timestamp_ms: self.now,
            }),
        }
    }

    fn emit(&mut self, mut r: Recharge) -> Step {
        self.seq += 1;
        r.request_id = format!("r{}", self.seq);
        r.facts.timestamp_ms = self.now;
        self.last_id.clone_from(&r.request_id);
        Step::Recharge(r)
    }

    /// Hands `step` out again on the next call (it keeps its time and id).
    pub fn unread(&mut self, step: Step) {
        assert!(self.stash.is_none(), "one step of look-ahead");
        self.stash = Some(step);
    }

    fn push(&mut self, r: Recharge) {
        self.queue.push_back(Pending::Step(Step::Recharge(r)));
    }

    fn user(&mut self) -> u64 {
        self.rng.below(USERS)
    }

    fn everyday(&mut self) -> u64 {
        self.rng.pick(&EVERYDAY_YUAN)
    }

    /// An everyday order by a regular user: own device, home address, one of
    /// their targets. Id and time are set when it is emitted.
    fn order(&mut self, user: u64, yuan: u64) -> Recharge {
        let ip = home_ip(user);
        let (target, product) = match self.rng.below(4) {
            0 => (format!("138{:08}", user), "phone_credit"),
            1 => (format!("138{:08}", user), "mobile_data"),
            2 => (format!("139{:08}", user), "phone_credit"),
            _ => (format!("game-{user}"), "game_card"),
        };
        Recharge {
            request_id: String::new(),
            facts: Facts {
                user_id: format!("u{user}"),
                ip_text: ip.to_string(),
                device_id: format!("d{user}"),
                target,
                channel: self.rng.pick(&CHANNELS).to_string(),
                product: product.to_string(),
                currency: "CNY".to_string(),
                amount: yuan as i64 * 100,
                timestamp_ms: 0,
            },
            ip,
            account: Account {
                real_name_verified: true,
                status: AccountStatus::Active,
                created_at_ms: T0_MS - 400 * DAY_MS,
                has_purchase_history: true,
            },
            attributes: HashMap::new(),
            dry_run: false,
        }
    }

    fn other_channel(&mut self, r: &mut Recharge) {
        let others: Vec<&str> = CHANNELS
            .into_iter()
            .filter(|c| *c != r.facts.channel)
            .collect();
        r.facts.channel = self.rng.pick(&others).to_string();
    }

    fn draw(&mut self) {
        let total: u64 = KINDS.iter().map(|k| k.0).sum();
        let mut d = self.rng.below(total);
        let kind = KINDS
            .iter()
            .find(|(w, _)| {
                if d < *w {
                    true
                } else {
                    d -= w;
                    false
                }
            })
            .map_or(Kind::Regular, |k| k.1);
        match kind {
            Kind::Regular => {
                let u = self.user();
                let yuan = self.everyday();
                let r = self.order(u, yuan);
                // The id is only known at emission; duplicates copy the content.
                self.last_regular = Some((u, r.clone()));
                self.queue.push_back(Pending::Regular(u, r));
            }
            Kind::NewDevice => {
                let u = self.user();
                let yuan = self.everyday();
                let mut r = self.order(u, yuan);
                r.facts.device_id = format!("nd-{}", self.rng.next_u64() % 1_000_000_000);
                self.push(r);
            }
            Kind::Duplicate => match self.last_regular.clone() {
                Some((_, mut r)) => {
                    self.other_channel(&mut r);
                    self.push(r);
                }
                None => {
                    let u = self.user();
                    let r = self.order(u, 100);
                    self.push(r);
                }
            },
            Kind::UnverifiedLarge => {
                let u = self.user();
                let yuan = 3000 + self.rng.below(3001);
                let mut r = self.order(u, yuan);
                r.facts.user_id = format!("v{u}");
                r.facts.device_id = format!("dv{u}");
                r.account.real_name_verified = false;
                self.push(r);
            }
            Kind::NewAccount => {
                let n = self.rng.next_u64() % 1_000_000_000;
                let yuan = self.rng.pick(&[50, 100, 200, 300, 500]);
                let mut r = self.order(USERS + n, yuan);
                r.facts.user_id = format!("n{n}");
                r.facts.device_id = format!("nd{n}");
                r.account.created_at_ms = self.now - self.rng.below(10 * DAY_MS as u64) as i64;
                r.account.has_purchase_history = false;
                self.push(r);
            }
            Kind::AccountState => {
                let u = self.user();
                let yuan = self.everyday();
                let mut r = self.order(u, yuan);
                r.account.status = self.rng.pick(&[
                    AccountStatus::Frozen,
                    AccountStatus::Lost,
                    AccountStatus::Arrears,
                    AccountStatus::Closed,
                ]);
                self.push(r);
            }
            Kind::Listed => {
                let u = self.user();
                let mut r = self.order(u, 600);
                match self.rng.below(4) {
                    0 => r.facts.user_id = "fraud-ring-001".to_string(),
                    1 => r.facts.device_id = "emulator-farm-42".to_string(),
                    2 => set_ip(&mut r, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 250))),
                    _ => r.facts.user_id = "vip-0001".to_string(), // allow-listed
                }
                self.push(r);
            }
            Kind::Burst => {
                let u = self.user();
                for _ in 0..6 + self.rng.below(3) {
                    let yuan = 500 + 100 * self.rng.below(16);
                    let r = self.order(u, yuan);
                    self.push(r);
                }
            }
            Kind::Traveller => {
                let u = self.user();
                let trip = self.rng.pick(&TRIPS);
                for step in 0..6 {
                    let yuan = self.rng.pick(&[50, 100, 200, 300]);
                    let mut r = self.order(u, yuan);
                    match step {
                        0..=2 => {}
                        4 => set_ip(&mut r, city_ip(&mut self.rng, trip.1)),
                        _ => set_ip(&mut r, city_ip(&mut self.rng, trip.0)),
                    }
                    self.push(r);
                }
            }
            Kind::SharedDevice => {
                let device = format!("farm-{}", self.rng.below(1000));
                for _ in 0..7 {
                    let u = self.user();
                    let yuan = self.everyday();
                    let mut r = self.order(u, yuan);
                    r.facts.device_id.clone_from(&device);
                    self.push(r);
                }
            }
            Kind::BotRetry => {
                let u = self.user();
                let device = format!("bot-{}", self.rng.below(1000));
                for i in 0..24u64 {
                    let mut r = self.order(u, 10 + 10 * (i % 3));
                    r.facts.device_id.clone_from(&device);
                    self.push(r);
                }
            }
            Kind::StolenAccount => {
                let u = self.user();
                let far = self.rng.pick(&FAR);
                let ip = city_ip(&mut self.rng, far);
                let device = format!("att-{}", self.rng.below(1_000_000));
                for i in 0..7 {
                    self.queue.push_back(Pending::Step(Step::Login(Login {
                        event_id: String::new(),
                        user_id: format!("u{u}"),
                        succeeded: i == 6,
                        ip: Some(ip),
                        ip_text: ip.to_string(),
                        device_id: device.clone(),
                        timestamp_ms: 0,
                    })));
                }
                // Three identical orders: duplicates; at 2,000 yuan the third
                // passes the verified daily limit and the challenges' scores
                // add up past block_score (SCORE_THRESHOLD).
                let yuan = self.rng.pick(&[300, 1000, 2000, 3000]);
                let mut r = self.order(u, yuan);
                set_ip(&mut r, ip);
                r.facts.device_id = device;
                for _ in 0..3 {
                    let mut again = r.clone();
                    self.other_channel(&mut again);
                    self.push(again);
                }
            }
            Kind::Chargeback => {
                if let Some((u, id)) = self.last_regular_id.clone() {
                    // Draws happen only when the queue is empty: that order
                    // was decided already.
                    self.queue.push_back(Pending::Step(Step::Outcome(Outcome {
                        request_id: id,
                        user_id: String::new(),
                        kind: OutcomeKind::Chargeback,
                        timestamp_ms: 0,
                    })));
                    let yuan = self.everyday();
                    let r = self.order(u, yuan);
                    self.push(r);
                }
            }
            Kind::ChallengeFailer => {
                let u = self.user();
                let first = self.order(u, 100);
                self.push(first.clone());
                for _ in 0..3 {
                    let mut dup = first.clone();
                    self.other_channel(&mut dup);
                    self.push(dup);
                    self.queue.push_back(Pending::FailLast);
                }
                let r = self.order(u, 50);
                self.push(r);
            }
            Kind::IpFlood => {
                let ip = city_ip(&mut self.rng, BEIJING);
                for _ in 0..320 {
                    let u = self.user();
                    let yuan = self.everyday();
                    let mut r = self.order(u, yuan);
                    set_ip(&mut r, ip);
                    self.push(r);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The pipeline, as `Engine::evaluate` runs it (minus async, log and tracing)
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    /// `Pack::run`: the Rhai scripts.
    Rhai,
    /// `Pack::run_rule_by_rule`: each script evaluated on its own by Rhai,
    /// without the fast path (compiled rules, merged segments).
    RhaiRuleByRule,
    /// `Native::run`: the same rules in Rust.
    Native,
}

/// One engine's worth of state with the engine's steps, each a public call:
/// idempotency claim, geo lookup, `begin`, `Pack::context`, rules, `combine`,
/// `settle`, and the stored decision.
pub struct Pipeline {
    pub pack: Arc<Pack>,
    pub store: Arc<MemoryStore>,
    pub geo: GeoDb,
    pub native: Arc<Native>,
}

/// Engine's private `fingerprint`, via the public `fnv1a`.
fn fingerprint(r: &Recharge) -> u64 {
    let f = &r.facts;
    fnv1a(&[
        f.user_id.as_bytes(),
        &f.amount.to_le_bytes(),
        f.currency.as_bytes(),
        f.target.as_bytes(),
    ])
}

impl Pipeline {
    pub fn new(pack: Arc<Pack>, geo: GeoDb, native: Arc<Native>) -> Pipeline {
        Pipeline {
            pack,
            store: Arc::new(MemoryStore::new(MemoryLimits::default())),
            geo,
            native,
        }
    }

    /// `Engine::evaluate` for a fresh request id (not a dry run).
    pub fn evaluate(&self, recharge: Recharge, rules: Rules) -> Arc<Decision> {
        self.evaluate_with(recharge, rules, None)
    }

    pub fn evaluate_with(
        &self,
        recharge: Recharge,
        rules: Rules,
        capture: Option<&mut Vec<Ctx>>,
    ) -> Arc<Decision> {
        let claim = self
            .store
            .claim(&recharge.request_id, fingerprint(&recharge))
            .expect("request ids are unique");
        if let Some(settled) = claim.entry.settled.get() {
            return Arc::new(settled.decision());
        }
        let settled = self.decide(recharge, rules, capture);
        let _ = claim.entry.settled.set(KeptDecision::new(&settled));
        settled.decision
    }

    /// `Engine::decide` with `record = true`.
    fn decide(&self, recharge: Recharge, rules: Rules, capture: Option<&mut Vec<Ctx>>) -> Settled {
        let pack = &*self.pack;
        let location = self.geo.lookup(recharge.ip);
        let begun = self
            .store
            .begin(&pack.plan, &recharge, location.as_deref(), true);
        let ctx = pack.context(recharge, location.clone(), begun);
        let verdict = match rules {
            Rules::Rhai => pack.run(&ctx),
            Rules::RhaiRuleByRule => pack.run_rule_by_rule(&ctx),
            Rules::Native => self.native.run(&ctx),
        };
        if let Some(capture) = capture {
            capture.push(ctx.clone());
        }
        let Recharge {
            request_id, facts, ..
        } = ctx.recharge;
        let lenient =
            (pack.leniency.as_ref()).is_some_and(|l| l.applies(facts.amount, &verdict.reasons));
        let decision = combine(
            request_id,
            facts.amount,
            verdict.reasons,
            verdict.shadow_reasons,
            &pack.policy,
            pack.leniency.as_ref(),
            pack.version.clone(),
        );
        let learn = decision.teaches_profile(lenient);
        self.store.settle(
            &pack.plan,
            &facts,
            decision.action,
            learn,
            location.as_deref(),
        );
        Settled {
            decision: Arc::new(decision),
            facts,
            location,
        }
    }

    /// `Engine::record_login` (no event id) and `Engine::report_outcome`.
    pub fn apply(&self, step: Step, rules: Rules) {
        match step {
            Step::Recharge(r) => {
                self.evaluate(r, rules);
            }
            Step::Login(login) => {
                let location = login.ip.and_then(|ip| self.geo.lookup(ip));
                self.store
                    .record_login(&self.pack.plan, &login, location.as_deref());
            }
            Step::Outcome(o) => {
                let Some(entry) = self.store.find(&o.request_id) else {
                    return;
                };
                let Some(kept) = entry.settled.get() else {
                    return;
                };
                let release = releases(o.kind, kept.action());
                if let OutcomeMark::Fresh { release } = entry.mark_outcome(o.kind, release) {
                    let settled = kept.settled();
                    let ts = o.timestamp_ms;
                    self.store
                        .apply_outcome(&self.pack.plan, &settled, o.kind, ts, release);
                }
            }
        }
    }

    /// Feeds `steps` steps (recharges decided with `rules`) untimed.
    pub fn warm(&self, traffic: &mut Traffic, steps: usize, rules: Rules) {
        for _ in 0..steps {
            self.apply(traffic.next_step(), rules);
            if let Some(now) = traffic.sweep_due() {
                self.sweep(now);
            }
        }
    }

    /// What the server's sweeper does: drop idle keys and profiles.
    pub fn sweep(&self, now_ms: i64) {
        self.store.expire(now_ms, self.pack.plan.profile_span_ms);
    }
}

/// Times `iters` recharges of the stream. Logins and outcomes in between are
/// applied untimed, in stream order, and so is a sweep of idle keys every
/// `SWEEP_EVERY_MS` of event time; decisions are dropped untimed (they live
/// on in the idempotency records anyway, as on the server).
/// Runs the timed part of a benchmark. Not inlined, so that an instruction
/// count can be restricted to it:
/// `valgrind --tool=callgrind --toggle-collect='*counted*' ...`
/// (see `RISKGATE_BENCH_ITERS` in `benches/decision.rs`).
#[inline(never)]
pub fn counted<R>(f: impl FnOnce() -> R) -> R {
    std::hint::black_box(f())
}

pub fn timed(
    traffic: &mut Traffic,
    iters: u64,
    mut apply: impl FnMut(Step),
    mut sweep: impl FnMut(i64),
    mut decide_all: impl FnMut(&mut Vec<Recharge>, &mut Vec<Arc<Decision>>),
) -> Duration {
    const BATCH: usize = 256;
    let mut total = Duration::ZERO;
    let mut done = 0u64;
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Vec::with_capacity(BATCH);
    while done < iters {
        let want = (iters - done).min(BATCH as u64) as usize;
        let mut sweep_after = None;
        while batch.len() < want {
            match traffic.next_step() {
                Step::Recharge(r) => batch.push(r),
                event if batch.is_empty() => apply(event),
                event => {
                    traffic.unread(event);
                    break;
                }
            }
            // A sweep comes right after the step that made it due, as in
            // `Pipeline::warm`, whatever the batch boundaries.
            if let Some(now) = traffic.sweep_due() {
                if batch.is_empty() {
                    sweep(now);
                } else {
                    sweep_after = Some(now);
                    break;
                }
            }
        }
        done += batch.len() as u64;
        let start = Instant::now();
        counted(|| decide_all(&mut batch, &mut out));
        total += start.elapsed();
        batch.clear();
        out.clear();
        if let Some(now) = sweep_after {
            sweep(now);
        }
    }
    total
}

// ---------------------------------------------------------------------------
// The shipped rules, natively
// ---------------------------------------------------------------------------

/// Window indices, resolved by name once.
struct W {
    user_large_orders_10m: usize,
    ip_recharges_10m: usize,
    device_recharges_10m: usize,
    device_users_1h: usize,
    user_amount_24h: usize,
    same_order_10m: usize,
    user_failed_logins_30m: usize,
    user_chargebacks_30d: usize,
    user_challenge_failures_24h: usize,
}

/// List indices, resolved by name once.
struct L {
    user_block: usize,
    device_block: usize,
    ip_block: usize,
}

/// The pack's `[params]`, read once.
struct P {
    large_order_amount: i64,
    burst_large_orders: i64,
    ip_recharges_per_10m: i64,
    device_recharges_per_10m: i64,
    device_users_per_hour: i64,
    location_min_history: i64,
    new_region_login_secs: i64,
    new_region_block_amount: i64,
    max_travel_kmh: i64,
    real_name_single_limit: i64,
    real_name_daily_limit: i64,
    verified_daily_limit: i64,
    new_account_days: i64,
    new_account_amount: i64,
    failed_logins_limit: i64,
    challenge_failures_limit: i64,
}

struct Hit {
    action: Action,
    code: &'static str,
    message: String,
    /// `.ask(...)`; empty: the policy's default for challenges.
    ask: &'static str,
}

fn hit(action: Action, code: &'static str, message: impl Into<String>) -> Option<Hit> {
    Some(Hit {
        action,
        code,
        message: message.into(),
        ask: "",
    })
}

fn block(code: &'static str, message: impl Into<String>) -> Option<Hit> {
    hit(Action::Block, code, message)
}

fn challenge(code: &'static str, message: impl Into<String>, ask: &'static str) -> Option<Hit> {
    Some(Hit {
        ask,
        ..hit(Action::Challenge, code, message)?
    })
}

/// The script API's `yuan(fen)`.
fn yuan(fen: i64) -> String {
    format!("{}.{:02}", fen / 100, (fen % 100).abs())
}

type RuleFn = fn(&Native, &Ctx) -> Option<Hit>;

struct NativeRule {
    f: RuleFn,
    id: Arc<str>,
    shadow: bool,
    soft: bool,
    score: i64,
}

/// The shipped pack's rules in Rust, reading the same `Ctx` as the scripts.
/// Rule ids, order, modes, scores and softness come from the loaded pack.
pub struct Native {
    rules: Vec<NativeRule>,
    default_challenge: String,
    w: W,
    l: L,
    p: P,
}

impl Native {
    /// Panics when the pack has a rule, window, list or parameter this file
    /// does not know (the shipped pack changed: update the native rules).
    pub fn new(pack: &Pack) -> Native {
        let window = |name: &str| {
            pack.plan
                .windows
                .iter()
                .position(|w| w.name == name)
                .unwrap_or_else(|| panic!("the pack has no window `{name}`"))
        };
        let list = |name: &str| {
            pack.lists
                .iter()
                .position(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("the pack has no list `{name}`"))
        };
        let params = &pack.names().params;
        let param = |name: &str| {
            params
                .get(name)
                .and_then(|v| v.as_int().ok())
                .unwrap_or_else(|| panic!("the pack has no integer parameter `{name}`"))
        };
        let rules = pack
            .rules
            .iter()
            .map(|r| {
                let f: RuleFn = match &*r.id {
                    "blocklist" => blocklist,
                    "account_state" => account_state,
                    "real_name" => real_name,
                    "burst_user" => burst_user,
                    "burst_ip_device" => burst_ip_device,
                    "new_account" => new_account,
                    "duplicate" => duplicate,
                    "wrong_password" => wrong_password,
                    "new_region_login" => new_region_login,
                    "unusual_location" => unusual_location,
                    "impossible_travel" => impossible_travel,
                    "chargeback_history" => chargeback_history,
                    "challenge_failures" => challenge_failures,
                    other => panic!("no native version of rule `{other}`"),
                };
                NativeRule {
                    f,
                    id: r.id.clone(),
                    shadow: r.mode == Mode::Shadow,
                    soft: r.soft,
                    score: r.score,
                }
            })
            .collect();
        Native {
            rules,
            default_challenge: pack.policy.default_challenge.clone(),
            w: W {
                user_large_orders_10m: window("user_large_orders_10m"),
                ip_recharges_10m: window("ip_recharges_10m"),
                device_recharges_10m: window("device_recharges_10m"),
                device_users_1h: window("device_users_1h"),
                user_amount_24h: window("user_amount_24h"),
                same_order_10m: window("same_order_10m"),
                user_failed_logins_30m: window("user_failed_logins_30m"),
                user_chargebacks_30d: window("user_chargebacks_30d"),
                user_challenge_failures_24h: window("user_challenge_failures_24h"),
            },
            l: L {
                user_block: list("user_block"),
                device_block: list("device_block"),
                ip_block: list("ip_block"),
            },
            p: P {
                large_order_amount: param("large_order_amount"),
                burst_large_orders: param("burst_large_orders"),
                ip_recharges_per_10m: param("ip_recharges_per_10m"),
                device_recharges_per_10m: param("device_recharges_per_10m"),
                device_users_per_hour: param("device_users_per_hour"),
                location_min_history: param("location_min_history"),
                new_region_login_secs: param("new_region_login_secs"),
                new_region_block_amount: param("new_region_block_amount"),
                max_travel_kmh: param("max_travel_kmh"),
                real_name_single_limit: param("real_name_single_limit"),
                real_name_daily_limit: param("real_name_daily_limit"),
                verified_daily_limit: param("verified_daily_limit"),
                new_account_days: param("new_account_days"),
                new_account_amount: param("new_account_amount"),
                failed_logins_limit: param("failed_logins_limit"),
                challenge_failures_limit: param("challenge_failures_limit"),
            },
        }
    }

    /// What `Pack::run` does, rule by rule, without Rhai.
    pub fn run(&self, ctx: &Ctx) -> Verdict {
        let mut verdict = Verdict::default();
        for rule in &self.rules {
            if rule.soft && ctx.allowlisted {
                continue;
            }
            let Some(hit) = (rule.f)(self, ctx) else {
                continue;
            };
            let challenge = if hit.action == Action::Challenge && hit.ask.is_empty() {
                self.default_challenge.clone()
            } else {
                hit.ask.to_string()
            };
            let reason = Reason {
                rule_id: rule.id.clone(),
                code: hit.code.to_string(),
                message: hit.message,
                action: hit.action,
                score: rule.score,
                challenge,
            };
            if rule.shadow {
                verdict.shadow_reasons.push(reason);
            } else {
                verdict.reasons.push(reason);
            }
        }
        verdict
    }

    fn window(&self, ctx: &Ctx, i: usize) -> i64 {
        ctx.windows[i]
    }
}

fn blocklist(n: &Native, ctx: &Ctx) -> Option<Hit> {
    if ctx.lists[n.l.user_block] {
        block(
            "USER_BLOCKED",
            "This account cannot recharge. Please contact customer service.",
        )
    } else if ctx.lists[n.l.device_block] {
        block(
            "DEVICE_BLOCKED",
            "Recharges from this device are not accepted.",
        )
    } else if ctx.lists[n.l.ip_block] {
        block(
            "IP_BLOCKED",
            "Recharges from your network are not accepted.",
        )
    } else {
        None
    }
}

fn account_state(_: &Native, ctx: &Ctx) -> Option<Hit> {
    match ctx.recharge.account.status.name() {
        "frozen" => block(
            "ACCOUNT_FROZEN",
            "Your account is frozen. Please contact customer service.",
        ),
        "lost" => block(
            "ACCOUNT_LOST",
            "This account was reported lost. Recover it before recharging.",
        ),
        "arrears" => block(
            "ACCOUNT_IN_ARREARS",
            "Your account is in arrears. Please settle the balance first.",
        ),
        "closed" => block("ACCOUNT_CLOSED", "This account is closed."),
        _ => None,
    }
}

fn real_name(n: &Native, ctx: &Ctx) -> Option<Hit> {
    let day = n.window(ctx, n.w.user_amount_24h);
    let amount = ctx.recharge.facts.amount;
    if !ctx.recharge.account.real_name_verified {
        if amount >= n.p.real_name_single_limit {
            return block(
                "REAL_NAME_REQUIRED",
                format!(
                    "Recharges of {} yuan or more need real-name verification.",
                    yuan(n.p.real_name_single_limit)
                ),
            );
        }
        if day > n.p.real_name_daily_limit {
            return block(
                "REAL_NAME_REQUIRED",
                format!(
                    "More than {} yuan in 24 hours needs real-name verification.",
                    yuan(n.p.real_name_daily_limit)
                ),
            );
        }
        None
    } else if day > n.p.verified_daily_limit {
        challenge(
            "DAILY_LIMIT_SMS",
            format!(
                "You recharged {} yuan in 24 hours. Please confirm with the SMS code.",
                yuan(day)
            ),
            "sms",
        )
    } else {
        None
    }
}

fn burst_user(n: &Native, ctx: &Ctx) -> Option<Hit> {
    let count = n.window(ctx, n.w.user_large_orders_10m);
    if ctx.recharge.facts.amount >= n.p.large_order_amount && count >= n.p.burst_large_orders {
        block(
            "BURST_FREQUENCY",
            format!("Too many large recharges in a short time ({count} in 10 minutes). Please try again later."),
        )
    } else {
        None
    }
}

fn burst_ip_device(n: &Native, ctx: &Ctx) -> Option<Hit> {
    if n.window(ctx, n.w.device_users_1h) > n.p.device_users_per_hour {
        challenge(
            "DEVICE_MANY_USERS",
            "This device was used by several accounts recently. Please verify.",
            "captcha",
        )
    } else if n.window(ctx, n.w.device_recharges_10m) > n.p.device_recharges_per_10m {
        challenge(
            "DEVICE_BURST",
            "Too many recharges from this device. Please verify.",
            "captcha",
        )
    } else if n.window(ctx, n.w.ip_recharges_10m) > n.p.ip_recharges_per_10m {
        challenge(
            "IP_BURST",
            "Too many recharges from your network. Please verify.",
            "captcha",
        )
    } else {
        None
    }
}

fn new_account(n: &Native, ctx: &Ctx) -> Option<Hit> {
    let r = &ctx.recharge;
    let a = &r.account;
    let age = if a.created_at_ms <= 0 {
        -1.0
    } else {
        (r.facts.timestamp_ms - a.created_at_ms).max(0) as f64 / 86_400_000.0
    };
    if age >= 0.0
        && age < n.p.new_account_days as f64
        && !a.has_purchase_history
        && r.facts.amount > n.p.new_account_amount
    {
        challenge(
            "NEW_ACCOUNT",
            "New accounts confirm larger recharges with an SMS code.",
            "sms",
        )
    } else {
        None
    }
}

fn duplicate(n: &Native, ctx: &Ctx) -> Option<Hit> {
    let f = &ctx.recharge.facts;
    if !f.target.is_empty() && n.window(ctx, n.w.same_order_10m) >= 2 {
        challenge(
            "DUPLICATE_SUSPECTED",
            format!(
                "The same {} yuan top-up for {} was just submitted. Confirm to pay again.",
                yuan(f.amount),
                f.target
            ),
            "sms",
        )
    } else {
        None
    }
}

fn wrong_password(n: &Native, ctx: &Ctx) -> Option<Hit> {
    if n.window(ctx, n.w.user_failed_logins_30m) >= n.p.failed_logins_limit {
        challenge(
            "PASSWORD_FAILURES",
            "Several wrong passwords were entered on this account. Please verify it is you.",
            "sms",
        )
    } else {
        None
    }
}

fn new_region_login(n: &Native, ctx: &Ctx) -> Option<Hit> {
    let p = &ctx.profile;
    let recent = p.secs_since_login >= 0 && p.secs_since_login <= n.p.new_region_login_secs;
    if recent && p.last_login_new_region && p.located_events >= n.p.location_min_history {
        if ctx.recharge.facts.amount > n.p.new_region_block_amount {
            block(
                "NEW_REGION_LOGIN",
                "A large recharge right after a login from a new place. Please contact customer service.",
            )
        } else {
            challenge(
                "NEW_REGION_LOGIN",
                "You just signed in from a new place. Please confirm with the SMS code.",
                "sms",
            )
        }
    } else {
        None
    }
}

fn unusual_location(n: &Native, ctx: &Ctx) -> Option<Hit> {
    let p = &ctx.profile;
    match &ctx.location {
        Some(loc) if p.located_events >= n.p.location_min_history && !p.usual_region => challenge(
            "LOCATION_UNUSUAL",
            format!(
                "This recharge comes from {}, not where you usually are. Please verify.",
                loc.region
            ),
            "sms",
        ),
        _ => None,
    }
}

fn impossible_travel(n: &Native, ctx: &Ctx) -> Option<Hit> {
    let p = &ctx.profile;
    if p.travel_kmh > n.p.max_travel_kmh as f64 {
        challenge(
            "IMPOSSIBLE_TRAVEL",
            format!(
                "Seen {} km away moments ago. Please verify.",
                p.travel_km.trunc() as i64
            ),
            "sms",
        )
    } else {
        None
    }
}

fn chargeback_history(n: &Native, ctx: &Ctx) -> Option<Hit> {
    if n.window(ctx, n.w.user_chargebacks_30d) > 0 {
        challenge(
            "CHARGEBACK_HISTORY",
            "Please confirm this recharge with the SMS code.",
            "sms",
        )
    } else {
        None
    }
}

fn challenge_failures(n: &Native, ctx: &Ctx) -> Option<Hit> {
    let failed = n.window(ctx, n.w.user_challenge_failures_24h);
    if failed >= n.p.challenge_failures_limit {
        block(
            "CHALLENGE_FAILURES",
            format!("Verification failed {failed} times today. Please contact customer service."),
        )
    } else {
        None
    }
}

// ---------------------------------------------------------------------------
// The equivalence check
// ---------------------------------------------------------------------------

/// What the check saw: the mix, and sampled contexts for the rules-only
/// benchmarks (taken after `begin`, so with real window values).
pub struct Checked {
    pub steps: usize,
    pub decisions: usize,
    pub actions: BTreeMap<&'static str, usize>,
    pub codes: BTreeMap<String, usize>,
    pub shadow_codes: BTreeMap<String, usize>,
    pub ctxs: Vec<Ctx>,
}

/// Every code the shipped rules can give; the mix should produce each.
pub const ALL_CODES: [&str; 22] = [
    "USER_BLOCKED",
    "DEVICE_BLOCKED",
    "IP_BLOCKED",
    "ACCOUNT_FROZEN",
    "ACCOUNT_LOST",
    "ACCOUNT_IN_ARREARS",
    "ACCOUNT_CLOSED",
    "REAL_NAME_REQUIRED",
    "DAILY_LIMIT_SMS",
    "BURST_FREQUENCY",
    "DEVICE_MANY_USERS",
    "DEVICE_BURST",
    "IP_BURST",
    "NEW_ACCOUNT",
    "DUPLICATE_SUSPECTED",
    "PASSWORD_FAILURES",
    "NEW_REGION_LOGIN",
    "LOCATION_UNUSUAL",
    "IMPOSSIBLE_TRAVEL",
    "CHARGEBACK_HISTORY",
    "CHALLENGE_FAILURES",
    "SCORE_THRESHOLD",
];

/// Feeds one stream to a Rhai pipeline and a native one, each with its own
/// store, and panics at the first decision that differs in any field
/// (action, challenge, score, every reason and shadow reason: rule, code,
/// message, action, score, challenge). Identical decisions keep the two
/// stores identical, so the whole run is compared, not just its start.
pub fn check(pack: &Arc<Pack>, geo: &GeoDb, native: &Arc<Native>, steps: usize) -> Checked {
    let rhai = Pipeline::new(pack.clone(), geo.clone(), native.clone());
    let nat = Pipeline::new(pack.clone(), geo.clone(), native.clone());
    let mut traffic = Traffic::new(1);
    let mut out = Checked {
        steps,
        decisions: 0,
        actions: BTreeMap::new(),
        codes: BTreeMap::new(),
        shadow_codes: BTreeMap::new(),
        ctxs: Vec::new(),
    };
    for i in 0..steps {
        match traffic.next_step() {
            Step::Recharge(r) => {
                let id = r.request_id.clone();
                let capture = out.decisions.is_multiple_of(16).then_some(&mut out.ctxs);
                let a = rhai.evaluate_with(r.clone(), Rules::Rhai, capture);
                let b = nat.evaluate(r, Rules::Native);
                assert!(
                    a == b,
                    "native and Rhai decisions differ at step {i}, request {id}:\n  rhai:   {a:?}\n  native: {b:?}"
                );
                out.decisions += 1;
                *out.actions.entry(a.action.name()).or_default() += 1;
                for r in &a.reasons {
                    *out.codes.entry(r.code.clone()).or_default() += 1;
                }
                for r in &a.shadow_reasons {
                    *out.shadow_codes.entry(r.code.clone()).or_default() += 1;
                }
            }
            event => {
                rhai.apply(event.clone(), Rules::Rhai);
                nat.apply(event, Rules::Native);
            }
        }
    }
    out
}

/// Writes a single-rule (or synthetic) copy of the shipped pack into `dir`:
/// the manifest up to its first `[[rules]]`, then `rules_toml`; lists and the
/// named scripts are copied.
pub fn write_pack(dir: &Path, rules_toml: &str, scripts: &[(&str, String)]) {
    let src = root().join("rules");
    let manifest = std::fs::read_to_string(src.join("pack.toml")).expect("rules/pack.toml");
    let head = &manifest[..manifest.find("[[rules]]").expect("a [[rules]] table")];
    std::fs::write(dir.join("pack.toml"), format!("{head}{rules_toml}")).expect("write pack.toml");
    std::fs::create_dir_all(dir.join("lists")).expect("mkdir lists");
    for entry in std::fs::read_dir(src.join("lists")).expect("rules/lists") {
        let entry = entry.expect("list entry");
        std::fs::copy(entry.path(), dir.join("lists").join(entry.file_name())).expect("copy list");
    }
    for (file, body) in scripts {
        std::fs::write(dir.join(file), body).expect("write script");
    }
}

/// One shipped rule on its own: id, script file, `[[rules]]` table, script.
pub struct RuleTable {
    pub id: String,
    pub file: String,
    pub table: String,
    pub script: String,
}

/// The `[[rules]]` tables of the shipped manifest, each with its script.
pub fn shipped_rule_tables(pack: &Pack) -> Vec<RuleTable> {
    let src = root().join("rules");
    let manifest = std::fs::read_to_string(src.join("pack.toml")).expect("rules/pack.toml");
    let tables: Vec<&str> = manifest.split("[[rules]]").skip(1).collect();
    assert_eq!(
        tables.len(),
        pack.rules.len(),
        "one [[rules]] table per rule"
    );
    pack.rules
        .iter()
        .zip(tables)
        .map(|(rule, table)| RuleTable {
            id: rule.id.to_string(),
            file: rule.file.clone(),
            table: format!("[[rules]]{table}"),
            script: std::fs::read_to_string(src.join(&rule.file)).expect("a rule script"),
        })
        .collect()
}
