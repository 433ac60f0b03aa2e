//! Per-user profiles: where a user usually is, and where they were last.
//!
//! Learned from located events: successful logins and allowed recharges (and
//! challenges the user passed). Bounded: the most recent [`RECENT`] located
//! events are kept, which is all the usual-region question needs.

use super::window::{prefetch_spilled, push_small, Entries};
use crate::geo::{distance_km, Location};

/// Located events remembered per user.
pub const RECENT: usize = 32;

/// What rules see of a profile, as of one request.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProfileView {
    /// Located events within the profile span (before this request).
    pub located_events: i64,
    /// The request's region is among them. False when the IP is not located.
    pub usual_region: bool,
    /// Distinct regions among them.
    pub usual_regions: i64,
    /// The last successful login came from a region that was new for the user.
    pub last_login_new_region: bool,
    /// Seconds since the last successful login; -1 when none is known.
    pub secs_since_login: i64,
    /// Distance from the last located event; 0 when either end is unknown.
    pub travel_km: f64,
    /// Speed needed to cover that distance (time floored at one minute).
    pub travel_kmh: f64,
}

/// The events of `recent` (oldest first) from `from` to `to`, both
/// included.
///
/// Looks at the two ends before it searches: for an active user every event
/// kept is usually live (requests come in time order, and the newest
/// [`RECENT`] events fall within the span), and the ends are two independent
/// loads. A binary search from the middle is a chain of dependent cache
/// misses on a profile that is not in cache, which most profiles of a large
/// store are not (a warm store's closed loop spent 0.4 us a request there).
fn live(recent: &[(i64, u64)], from: i64, to: i64) -> &[(i64, u64)] {
    let lo = match recent.first() {
        Some((t, _)) if *t < from => recent.partition_point(|(t, _)| *t < from),
        _ => 0,
    };
    let hi = match recent.last() {
        Some((t, _)) if *t > to => recent.partition_point(|(t, _)| *t <= to),
        _ => recent.len(),
    };
    &recent[lo..hi.max(lo)]
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    ts_ms: i64,
    lat: f64,
    lon: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    /// (event time, region key), oldest first.
    recent: Entries<(i64, u64)>,
    last_point: Option<Point>,
    /// (time, was the region new) of the last successful login.
    last_login: Option<(i64, bool)>,
}

impl Profile {
    /// Asks for the recent regions' line when they are on the heap.
    pub(crate) fn prefetch(&self) {
        prefetch_spilled(&self.recent);
    }

    pub fn view(&self, ts_ms: i64, span_ms: i64, loc: Option<&Location>) -> ProfileView {
        let from = ts_ms - span_ms;
        let live = live(&self.recent, from, ts_ms);
        // At most 32 events: counting distinct regions in place beats
        // allocating a set on every request.
        let usual_regions = live
            .iter()
            .enumerate()
            .filter(|(i, (_, r))| !live[..*i].iter().any(|(_, q)| q == r))
            .count() as i64;
        let (travel_km, travel_kmh) = match (self.last_point, loc) {
            (Some(p), Some(l)) if ts_ms >= p.ts_ms => {
                let km = distance_km(p.lat, p.lon, l.latitude, l.longitude);
                let hours = ((ts_ms - p.ts_ms) as f64 / 3_600_000.0).max(1.0 / 60.0);
                (km, km / hours)
            }
            _ => (0.0, 0.0),
        };
        ProfileView {
            located_events: live.len() as i64,
            usual_region: loc.is_some_and(|l| live.iter().any(|(_, r)| *r == l.region_key)),
            usual_regions,
            last_login_new_region: self.last_login.is_some_and(|(_, new)| new),
            secs_since_login: self
                .last_login
                .map_or(-1, |(t, _)| ((ts_ms - t).max(0)) / 1000),
            travel_km,
            travel_kmh,
        }
    }

    /// How many located events are kept: a read of the profile itself and
    /// nothing more ([`crate::state::MemoryStore`] loads every slot of a
    /// request at once, so their cache misses overlap).
    pub fn events(&self) -> usize {
        self.recent.len()
    }

    /// Remembers a located event as usual for the user.
    pub fn learn(&mut self, ts_ms: i64, loc: &Location) {
        if self.recent.len() >= RECENT {
            // Full: the oldest goes, unless the newcomer (a late event)
            // would itself be the oldest kept.
            if self.recent.first().is_some_and(|(t, _)| ts_ms < *t) {
                return;
            }
            self.recent.remove(0);
        }
        let at = match self.recent.last() {
            Some((t, _)) if *t > ts_ms => self.recent.partition_point(|(t, _)| *t <= ts_ms),
            _ => self.recent.len(),
        };
        if at == self.recent.len() {
            // The usual case: events arrive in time order.
            push_small(&mut self.recent, (ts_ms, loc.region_key));
        } else {
            self.recent.insert(at, (ts_ms, loc.region_key));
        }
    }

    /// Remembers where the user was last seen (any located event).
    pub fn saw(&mut self, ts_ms: i64, loc: &Location) {
        if self.last_point.is_none_or(|p| p.ts_ms <= ts_ms) {
            self.last_point = Some(Point {
                ts_ms,
                lat: loc.latitude,
                lon: loc.longitude,
            });
        }
    }

    /// A successful login: marks whether its region was new, then learns it.
    pub fn login(&mut self, ts_ms: i64, span_ms: i64, loc: Option<&Location>) {
        let view = self.view(ts_ms, span_ms, loc);
        let new_region = loc.is_some() && view.located_events > 0 && !view.usual_region;
        if self.last_login.is_none_or(|(t, _)| t <= ts_ms) {
            self.last_login = Some((ts_ms, new_region));
        }
        if let Some(l) = loc {
            self.learn(ts_ms, l);
            self.saw(ts_ms, l);
        }
    }

    pub fn is_idle(&self, now_ms: i64, span_ms: i64) -> bool {
        let newest = self
            .recent
            .last()
            .map(|(t, _)| *t)
            .into_iter()
            .chain(self.last_point.map(|p| p.ts_ms))
            .chain(self.last_login.map(|(t, _)| t))
            .max();
        newest.is_none_or(|t| t < now_ms - span_ms)
    }

    pub fn heap_bytes(&self) -> usize {
        super::window::heap_bytes(&self.recent)
    }

    /// A compact, versioned byte form (Redis values, snapshots): a version
    /// byte, flags, the optional last point and login, then the recent
    /// events, all little-endian.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(PROFILE_FORMAT);
        let flags = u8::from(self.last_point.is_some())
            | u8::from(self.last_login.is_some()) << 1
            | u8::from(self.last_login.is_some_and(|(_, new)| new)) << 2;
        out.push(flags);
        if let Some(p) = self.last_point {
            out.extend_from_slice(&p.ts_ms.to_le_bytes());
            out.extend_from_slice(&p.lat.to_le_bytes());
            out.extend_from_slice(&p.lon.to_le_bytes());
        }
        if let Some((t, _)) = self.last_login {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out.push(self.recent.len() as u8);
        for (t, r) in &self.recent {
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&r.to_le_bytes());
        }
    }

    /// Reads [`Profile::encode`]'s form; None when it is not that.
    pub fn decode(bytes: &[u8]) -> Option<Profile> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<[u8; 8]> {
            let chunk = bytes.get(at..at + n)?;
            at += n;
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(chunk);
            Some(b)
        };
        if take(1)?[0] != PROFILE_FORMAT {
            return None;
        }
        let flags = take(1)?[0];
        let i64_ = |b: [u8; 8]| i64::from_le_bytes(b);
        let mut p = Profile::default();
        if flags & 1 != 0 {
            p.last_point = Some(Point {
                ts_ms: i64_(take(8)?),
                lat: f64::from_le_bytes(take(8)?),
                lon: f64::from_le_bytes(take(8)?),
            });
        }
        if flags & 2 != 0 {
            p.last_login = Some((i64_(take(8)?), flags & 4 != 0));
        }
        let n = take(1)?[0] as usize;
        if n > RECENT {
            return None;
        }
        p.recent.reserve_exact(n);
        for _ in 0..n {
            p.recent
                .push((i64_(take(8)?), u64::from_le_bytes(take(8)?)));
        }
        (at == bytes.len()).then_some(p)
    }
}

impl Profile {
    /// Everything the profile holds (snapshots).
    pub fn parts(&self) -> ProfileParts<'_> {
        ProfileParts {
            recent: &self.recent,
            last_point: self.last_point.map(|p| (p.ts_ms, p.lat, p.lon)),
            last_login: self.last_login,
        }
    }

    /// Rebuilds a profile from its parts (snapshots): events sorted by time,
    /// the most recent [`RECENT`] kept.
    pub fn from_parts(
        mut recent: Vec<(i64, u64)>,
        last_point: Option<(i64, f64, f64)>,
        last_login: Option<(i64, bool)>,
    ) -> Profile {
        recent.sort_by_key(|(t, _)| *t);
        if recent.len() > RECENT {
            recent.drain(..recent.len() - RECENT);
        }
        recent.shrink_to_fit();
        Profile {
            recent: Entries::from_vec(recent),
            last_point: last_point.map(|(ts_ms, lat, lon)| Point { ts_ms, lat, lon }),
            last_login,
        }
    }
}

/// A profile's contents, borrowed (see [`Profile::parts`]).
pub struct ProfileParts<'a> {
    /// (event time, region key), oldest first.
    pub recent: &'a [(i64, u64)],
    /// (time, latitude, longitude) of the last located event.
    pub last_point: Option<(i64, f64, f64)>,
    /// (time, was the region new) of the last successful login.
    pub last_login: Option<(i64, bool)>,
}

/// The version byte of [`Profile::encode`].
const PROFILE_FORMAT: u8 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn loc(region: &str, lat: f64, lon: f64) -> Location {
        Location::new("CN".into(), region.into(), region.into(), lat, lon)
    }

    #[test]
    fn live_events_are_those_within_the_span_at_either_end() {
        let events: Vec<(i64, u64)> = [10, 20, 30, 40].iter().map(|&t| (t, t as u64)).collect();
        let times = |from, to| {
            live(&events, from, to)
                .iter()
                .map(|e| e.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(times(0, 50), [10, 20, 30, 40], "all live: no search");
        assert_eq!(times(10, 40), [10, 20, 30, 40], "both ends included");
        assert_eq!(times(25, 50), [30, 40], "older ones left out");
        assert_eq!(
            times(0, 35),
            [10, 20, 30],
            "later ones (late requests) left out"
        );
        assert_eq!(times(15, 35), [20, 30]);
        assert!(times(50, 60).is_empty(), "all too old");
        assert!(times(0, 5).is_empty(), "all too new");
        assert!(live(&[], 0, 10).is_empty());
    }

    #[test]
    fn usual_regions_come_from_recent_history() {
        let beijing = loc("Beijing", 39.9, 116.4);
        let chengdu = loc("Sichuan", 30.7, 104.1);
        let mut p = Profile::default();
        for d in 0..3 {
            p.learn(d * DAY, &beijing);
        }
        let v = p.view(3 * DAY, 30 * DAY, Some(&chengdu));
        assert_eq!(
            (v.located_events, v.usual_region, v.usual_regions),
            (3, false, 1)
        );
        assert!(p.view(3 * DAY, 30 * DAY, Some(&beijing)).usual_region);
        // Forty days on, the history has aged out.
        assert_eq!(p.view(40 * DAY, 30 * DAY, Some(&beijing)).located_events, 0);
    }

    /// A full history keeps its newest events: a late event older than all
    /// of them is not learned in place of one.
    #[test]
    fn a_full_history_keeps_its_newest_events() {
        let beijing = loc("Beijing", 39.9, 116.4);
        let chengdu = loc("Sichuan", 30.7, 104.1);
        let mut p = Profile::default();
        for i in 0..RECENT as i64 {
            p.learn(DAY + i * 1000, &beijing);
        }
        p.learn(0, &chengdu);
        assert_eq!(p.events(), RECENT);
        let v = p.view(2 * DAY, 30 * DAY, Some(&chengdu));
        assert!(
            !v.usual_region,
            "the late Chengdu event took a newer one's place"
        );
        // A newer one takes the oldest's place.
        p.learn(2 * DAY, &chengdu);
        assert!(p.view(2 * DAY, 30 * DAY, Some(&chengdu)).usual_region);
        assert_eq!(p.events(), RECENT);
    }

    #[test]
    fn travel_speed_between_points() {
        let mut p = Profile::default();
        p.saw(0, &loc("Beijing", 39.9042, 116.4074));
        // Shanghai an hour later: about 1,070 km/h, faster than any train.
        let v = p.view(
            3_600_000,
            30 * DAY,
            Some(&loc("Shanghai", 31.2304, 121.4737)),
        );
        assert!((v.travel_kmh - 1067.0).abs() < 30.0, "{v:?}");
    }

    #[test]
    fn encodes_and_decodes() {
        let mut p = Profile::default();
        assert_eq!(roundtrip(&p), p);
        p.login(0, 30 * DAY, Some(&loc("Beijing", 39.9, 116.4)));
        p.login(60_000, 30 * DAY, Some(&loc("Hebei", 38.0, 114.5)));
        let back = roundtrip(&p);
        assert_eq!(back, p);
        let mut bytes = Vec::new();
        p.encode(&mut bytes);
        for cut in 0..bytes.len() {
            assert!(Profile::decode(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        bytes.push(0);
        assert!(Profile::decode(&bytes).is_none(), "trailing bytes");
    }

    fn roundtrip(p: &Profile) -> Profile {
        let mut bytes = Vec::new();
        p.encode(&mut bytes);
        Profile::decode(&bytes).expect("decodes")
    }

    #[test]
    fn login_from_new_region_is_marked() {
        let beijing = loc("Beijing", 39.9, 116.4);
        let harbin = loc("Heilongjiang", 45.8, 126.5);
        let mut p = Profile::default();
        p.login(0, 30 * DAY, Some(&beijing));
        // The very first login has no history to be new against.
        assert!(!p.view(1000, 30 * DAY, None).last_login_new_region);
        p.login(60_000, 30 * DAY, Some(&harbin));
        let v = p.view(120_000, 30 * DAY, Some(&harbin));
        assert!(v.last_login_new_region);
        assert_eq!(v.secs_since_login, 60);
    }
}
