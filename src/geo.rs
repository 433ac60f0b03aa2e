//! IP address -> location, from a small CSV table or a MaxMind DB (`.mmdb`) file.
//!
//! Risk rules ask "where is this request from, and how far is that from last time?" on every
//! event, so the CSV table is pre-indexed at load time and lookups hand out `Arc` clones of
//! records built once. MMDB lookups decode on demand (the reader keeps the whole file in memory).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::Deserialize;

/// One located place. Built once per database record; lookups hand out `Arc` clones.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Location {
    /// ISO 3166-1 alpha-2 country code, e.g. "CN".
    pub country: String,
    /// Province/state name; empty when the database does not know it.
    pub region: String,
    /// City name; empty when the database does not know it.
    pub city: String,
    /// Degrees. NaN when an mmdb record has no coordinates, so that any distance computed from
    /// it is NaN and compares false against every threshold instead of pointing at (0, 0).
    pub latitude: f64,
    /// Degrees; NaN like `latitude`.
    pub longitude: f64,
    /// FNV-1a 64 of `country \x1f region`: profiles compare regions as integers, and the value
    /// must survive restarts and cross processes, so no randomly seeded hasher.
    pub region_key: u64,
}

impl Location {
    /// Builds a location and computes its `region_key`.
    pub fn new(
        country: String,
        region: String,
        city: String,
        latitude: f64,
        longitude: f64,
    ) -> Location {
        let region_key = fnv1a64(&[country.as_bytes(), b"\x1f", region.as_bytes()]);
        Location {
            country,
            region,
            city,
            latitude,
            longitude,
            region_key,
        }
    }
}

fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|part| part.iter()) {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Great-circle distance in km (haversine, mean earth radius 6371 km). NaN in, NaN out.
pub fn distance_km(a_lat: f64, a_lon: f64, b_lat: f64, b_lon: f64) -> f64 {
    // A user seen again where they were last seen (the common case): the
    // formula gives exactly 0 there, without its four trig calls.
    if a_lat == b_lat && a_lon == b_lon && a_lat.is_finite() && a_lon.is_finite() {
        return 0.0;
    }
    let (phi1, phi2) = (a_lat.to_radians(), b_lat.to_radians());
    let half_dphi = (phi2 - phi1) / 2.0;
    let half_dlambda = (b_lon - a_lon).to_radians() / 2.0;
    let h = half_dphi.sin().powi(2) + phi1.cos() * phi2.cos() * half_dlambda.sin().powi(2);
    // clamp (unlike min) keeps NaN, and guards asin against rounding just above 1.
    2.0 * 6371.0 * h.sqrt().clamp(0.0, 1.0).asin()
}

/// Why a geo database could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    /// The file could not be read (missing, unreadable, CSV not UTF-8).
    #[error("{path}: {source}")]
    Io {
        /// The file as given.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Every bad line of a CSV file, each formatted `FILE:LINE: message`, so one run shows
    /// all the mistakes instead of one per restart.
    #[error("{}", .lines.join("\n"))]
    Csv {
        /// `FILE:LINE: message`, in file order.
        lines: Vec<String>,
    },
    /// The first non-comment line is not the expected header (or there is none), so the
    /// columns cannot be trusted at all.
    #[error("{origin}:{line}: bad header {found:?}, expected \"{CSV_HEADER}\"")]
    Header {
        /// The file as named to `from_csv`.
        origin: String,
        /// 1-based line number.
        line: usize,
        /// The header line as found (empty when the file has none).
        found: String,
    },
    /// The `.mmdb` file is not a valid MaxMind DB.
    #[error("{path}: not a MaxMind DB: {source}")]
    Mmdb {
        /// The file as given.
        path: String,
        /// The reader's complaint.
        source: maxminddb::MaxMindDbError,
    },
    /// Neither `.mmdb` nor `.csv` (nor extension-less): refused rather than misread.
    #[error("{path}: unknown geo database type (expected .mmdb, .csv or no extension)")]
    UnknownExtension {
        /// The file as given.
        path: String,
    },
}

const CSV_HEADER: &str = "network,country,region,city,latitude,longitude";

/// An IP -> location database. Cheap to clone (an `Arc` inside), `Send + Sync`.
#[derive(Clone)]
pub struct GeoDb {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    description: String,
}

enum Backend {
    Table(Table),
    Mmdb(maxminddb::Reader<Vec<u8>>),
}

/// Longest-prefix index: one hash map per prefix length present, longest first, so a lookup
/// costs at most one probe per distinct length (a handful in practice) and never allocates.
#[derive(Default)]
struct Table {
    records: Vec<Arc<Location>>,
    v4: Vec<(u8, HashMap<u32, u32>)>,
    v6: Vec<(u8, HashMap<u128, u32>)>,
}

fn mask4(addr: u32, len: u8) -> u32 {
    addr & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask6(addr: u128, len: u8) -> u128 {
    addr & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

fn probe<K: Hash + Eq>(levels: &[(u8, HashMap<K, u32>)], key: impl Fn(u8) -> K) -> Option<u32> {
    levels
        .iter()
        .find_map(|(len, map)| map.get(&key(*len)).copied())
}

fn longest_first<K>(levels: BTreeMap<u8, HashMap<K, u32>>) -> Vec<(u8, HashMap<K, u32>)> {
    levels.into_iter().rev().collect()
}

/// A network of IPv4-mapped addresses (`::ffff:192.0.2.0/120`) as the IPv4
/// network it maps (`192.0.2.0/24`): lookups see mapped addresses as IPv4
/// (see [`normalize`]), so in the IPv6 table such a row would never match.
fn mapped_to_v4(network: IpNetwork) -> IpNetwork {
    match network {
        IpNetwork::V6(n) if n.prefix() >= 96 => n
            .ip()
            .to_ipv4_mapped()
            .and_then(|ip| ipnetwork::Ipv4Network::new(ip, n.prefix() - 96).ok())
            .map_or(network, IpNetwork::V4),
        other => other,
    }
}

/// `::ffff:a.b.c.d` is how dual-stack sockets report IPv4 clients; treat it as a.b.c.d.
fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl GeoDb {
    fn new(backend: Backend, description: String) -> GeoDb {
        GeoDb {
            inner: Arc::new(Inner {
                backend,
                description,
            }),
        }
    }

    /// Opens by file extension: `.mmdb` -> MaxMind reader (whole file read into memory),
    /// `.csv` or none -> CSV; anything else (say a `.tar.gz` download) is refused rather than
    /// misread.
    pub fn open(path: &Path) -> Result<GeoDb, GeoError> {
        let shown = path.display().to_string();
        let io = |source| GeoError::Io {
            path: shown.clone(),
            source,
        };
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("mmdb") => {
                let bytes = std::fs::read(path).map_err(io)?;
                let reader =
                    maxminddb::Reader::from_source(bytes).map_err(|source| GeoError::Mmdb {
                        path: shown.clone(),
                        source,
                    })?;
                let meta = reader.metadata();
                let (y, m, d) = civil_date(meta.build_epoch);
                let scope = if meta.ip_version == 4 {
                    ", IPv4 only"
                } else {
                    ""
                };
                let description = format!(
                    "mmdb {shown} ({}, built {y:04}-{m:02}-{d:02}{scope})",
                    meta.database_type
                );
                Ok(GeoDb::new(Backend::Mmdb(reader), description))
            }
            Some("csv") | None => {
                GeoDb::from_csv(&std::fs::read_to_string(path).map_err(io)?, &shown)
            }
            Some(_) => Err(GeoError::UnknownExtension { path: shown }),
        }
    }

    /// Parses CSV text (see `geo/demo.csv`); `origin` names the file in error messages.
    pub fn from_csv(text: &str, origin: &str) -> Result<GeoDb, GeoError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, line)| (i + 1, line.trim_start_matches('\u{feff}').trim()))
            .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
        let Some((header_line, header)) = lines.next() else {
            return Err(GeoError::Header {
                origin: origin.into(),
                line: 1,
                found: String::new(),
            });
        };
        if header.split(',').map(csv_field).ne(CSV_HEADER.split(',')) {
            let found = header.to_string();
            return Err(GeoError::Header {
                origin: origin.into(),
                line: header_line,
                found,
            });
        }
        let mut table = Table::default();
        let (mut v4, mut v6) = (BTreeMap::new(), BTreeMap::new());
        let (mut first_seen, mut errors) = (Vec::new(), Vec::new());
        for (line_no, line) in lines {
            let (network, location) = match parse_row(line) {
                Ok(row) => row,
                Err(message) => {
                    errors.push(format!("{origin}:{line_no}: {message}"));
                    continue;
                }
            };
            let index = table.records.len() as u32;
            let previous = match mapped_to_v4(network) {
                IpNetwork::V4(n) => v4
                    .entry(n.prefix())
                    .or_insert_with(HashMap::new)
                    .insert(mask4(n.ip().into(), n.prefix()), index),
                IpNetwork::V6(n) => v6
                    .entry(n.prefix())
                    .or_insert_with(HashMap::new)
                    .insert(mask6(n.ip().into(), n.prefix()), index),
            };
            if let Some(previous) = previous {
                let first = first_seen.get(previous as usize).copied().unwrap_or(0);
                errors.push(format!(
                    "{origin}:{line_no}: duplicate network {network} (first on line {first})"
                ));
            }
            table.records.push(Arc::new(location));
            first_seen.push(line_no);
        }
        if !errors.is_empty() {
            return Err(GeoError::Csv { lines: errors });
        }
        (table.v4, table.v6) = (longest_first(v4), longest_first(v6));
        let description = format!("csv {origin} ({} networks)", table.records.len());
        Ok(GeoDb::new(Backend::Table(table), description))
    }

    /// An empty database: every lookup is None.
    pub fn empty() -> GeoDb {
        GeoDb::new(
            Backend::Table(Table::default()),
            "none (empty geo database)".into(),
        )
    }

    /// Longest-prefix lookup. None = unknown location (no network matches, the record has no
    /// country, an IPv6 address in an IPv4-only mmdb, or an undecodable mmdb record).
    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<Location>> {
        match (&self.inner.backend, normalize(ip)) {
            (Backend::Table(t), IpAddr::V4(a)) => probe(&t.v4, |len| mask4(a.into(), len))
                .and_then(|i| t.records.get(i as usize).cloned()),
            (Backend::Table(t), IpAddr::V6(a)) => probe(&t.v6, |len| mask6(a.into(), len))
                .and_then(|i| t.records.get(i as usize).cloned()),
            (Backend::Mmdb(reader), ip) => {
                let record = reader.lookup(ip).and_then(|r| r.decode::<MmdbRecord>());
                match record {
                    Ok(record) => record?.into_location().map(Arc::new),
                    Err(error) => {
                        tracing::debug!(%ip, %error, "mmdb lookup failed");
                        None
                    }
                }
            }
        }
    }

    /// Human description for logs, e.g. "csv geo/demo.csv (10 networks)".
    pub fn describe(&self) -> String {
        self.inner.description.clone()
    }
}

impl Default for GeoDb {
    fn default() -> GeoDb {
        GeoDb::empty()
    }
}

impl fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GeoDb")
            .field(&self.inner.description)
            .finish()
    }
}

/// Trims a CSV field and drops one pair of surrounding double quotes.
fn csv_field(raw: &str) -> &str {
    let field = raw.trim();
    field
        .strip_prefix('"')
        .and_then(|f| f.strip_suffix('"'))
        .unwrap_or(field)
}

fn parse_row(line: &str) -> Result<(IpNetwork, Location), String> {
    let fields: Vec<&str> = line.split(',').map(csv_field).collect();
    let [network, country, region, city, lat, lon] = fields[..] else {
        return Err(format!(
            "expected 6 fields ({CSV_HEADER}), found {}",
            fields.len()
        ));
    };
    let network: IpNetwork = network
        .parse()
        .map_err(|e| format!("bad network {network:?}: {e}"))?;
    if country.is_empty() {
        return Err("empty country".into());
    }
    let coordinate = |text: &str, name: &str, limit: f64| match text.parse::<f64>() {
        Ok(v) if v.abs() <= limit => Ok(v),
        _ => Err(format!(
            "bad {name} {text:?} (want a number within ±{limit})"
        )),
    };
    let (lat, lon) = (
        coordinate(lat, "latitude", 90.0)?,
        coordinate(lon, "longitude", 180.0)?,
    );
    Ok((
        network,
        Location::new(
            country.to_ascii_uppercase(),
            region.into(),
            city.into(),
            lat,
            lon,
        ),
    ))
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (H. Hinnant's algorithm);
/// only for `describe`, to avoid a date crate.
fn civil_date(epoch_secs: u64) -> (i64, u32, u32) {
    let z = (epoch_secs / 86_400) as i64 + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// One mmdb record in either supported schema; all fields optional, unknown ones ignored.
/// MaxMind GeoIP2/GeoLite2 City: `country.iso_code`, `subdivisions[].names.en`, `city.names.en`,
/// `location.{latitude,longitude}`. ip-location-db flat builds: `country_code`, `state1`,
/// `city` (a plain string), `latitude`/`longitude` (float or string).
#[derive(Deserialize, Default)]
#[serde(default)]
struct MmdbRecord {
    country: Option<MmdbCountry>,
    subdivisions: Vec<MmdbNamed>,
    location: Option<MmdbCoords>,
    country_code: Option<String>,
    state1: Option<String>,
    city: Option<MmdbCity>,
    latitude: Option<Coord>,
    longitude: Option<Coord>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MmdbCountry {
    iso_code: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MmdbNamed {
    iso_code: Option<String>,
    names: MmdbNames,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MmdbNames {
    en: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MmdbCoords {
    latitude: Option<Coord>,
    longitude: Option<Coord>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MmdbCity {
    Plain(String),
    Named {
        #[serde(default)]
        names: MmdbNames,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Coord {
    Number(f64),
    Text(String),
}

impl Coord {
    fn value(coord: Option<Coord>) -> f64 {
        match coord {
            Some(Coord::Number(v)) => v,
            Some(Coord::Text(s)) => s.trim().parse().unwrap_or(f64::NAN),
            None => f64::NAN,
        }
    }
}

impl MmdbRecord {
    fn into_location(self) -> Option<Location> {
        let country = self.country.and_then(|c| c.iso_code).or(self.country_code);
        let country = country.filter(|c| !c.is_empty())?;
        let region = match self.subdivisions.into_iter().next() {
            Some(first) => first.names.en.filter(|n| !n.is_empty()).or(first.iso_code),
            None => self.state1,
        };
        let city = match self.city {
            Some(MmdbCity::Plain(name)) => Some(name),
            Some(MmdbCity::Named { names }) => names.en,
            None => None,
        };
        let (lat, lon) = match self.location {
            Some(loc) => (loc.latitude, loc.longitude),
            None => (self.latitude, self.longitude),
        };
        let (lat, lon) = (Coord::value(lat), Coord::value(lon));
        Some(Location::new(
            country,
            region.unwrap_or_default(),
            city.unwrap_or_default(),
            lat,
            lon,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn demo() -> GeoDb {
        GeoDb::from_csv(include_str!("../geo/demo.csv"), "geo/demo.csv").expect("demo.csv parses")
    }

    fn city(db: &GeoDb, addr: &str) -> Option<String> {
        db.lookup(ip(addr)).map(|l| l.city.clone())
    }

    #[test]
    fn demo_csv_parses_and_describes_itself() {
        let db = demo();
        assert_eq!(db.describe(), "csv geo/demo.csv (10 networks)");
        let bj = db.lookup(ip("192.0.2.1")).expect("Beijing");
        assert_eq!(
            (bj.country.as_str(), bj.region.as_str(), bj.city.as_str()),
            ("CN", "Beijing", "Beijing")
        );
        assert_eq!(city(&db, "203.0.113.200").as_deref(), Some("Urumqi"));
    }

    #[test]
    fn nested_range_wins_longest_prefix() {
        let db = demo();
        assert_eq!(city(&db, "192.0.2.63").as_deref(), Some("Beijing"));
        assert_eq!(city(&db, "192.0.2.64").as_deref(), Some("Tianjin"));
        assert_eq!(city(&db, "192.0.2.127").as_deref(), Some("Tianjin"));
        assert_eq!(city(&db, "192.0.2.128").as_deref(), Some("Shanghai"));
        // Same record twice: a shared Arc, not a fresh allocation.
        let (a, b) = (
            db.lookup(ip("192.0.2.70")).unwrap(),
            db.lookup(ip("192.0.2.71")).unwrap(),
        );
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn ipv6_and_ipv4_mapped_lookups() {
        let db = demo();
        assert_eq!(city(&db, "2001:db8::1").as_deref(), Some("Hangzhou"));
        assert_eq!(city(&db, "2001:db8:8000::1").as_deref(), Some("Wuhan"));
        assert_eq!(
            city(&db, "::ffff:198.51.100.200").as_deref(),
            Some("Chengdu")
        );
        assert_eq!(city(&db, "::ffff:192.0.2.64").as_deref(), Some("Tianjin"));
    }

    /// A row written as IPv4-mapped IPv6 is the IPv4 network it maps: it
    /// matches both spellings of its addresses, and clashes with the same
    /// network written as IPv4.
    #[test]
    fn a_mapped_network_row_is_its_ipv4_network() {
        let header = "network,country,region,city,latitude,longitude\n";
        let csv = format!("{header}::ffff:192.0.2.0/120,CN,Beijing,Beijing,39.9,116.4\n");
        let db = GeoDb::from_csv(&csv, "mapped.csv").expect("parses");
        for addr in ["192.0.2.7", "::ffff:192.0.2.7"] {
            assert_eq!(city(&db, addr).as_deref(), Some("Beijing"), "{addr}");
        }
        assert_eq!(city(&db, "192.0.3.7"), None);
        let both = format!("{csv}192.0.2.0/24,CN,Tianjin,Tianjin,39.1,117.2\n");
        let err = GeoDb::from_csv(&both, "mapped.csv")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mapped.csv:3: duplicate network"), "{err}");
    }

    #[test]
    fn unknown_addresses_are_none() {
        let db = demo();
        for addr in ["10.0.0.1", "8.8.8.8", "2001:db9::1", "::1", "::c000:201"] {
            assert_eq!(db.lookup(ip(addr)), None, "{addr}");
        }
        assert_eq!(GeoDb::empty().lookup(ip("192.0.2.1")), None);
    }

    #[test]
    fn bare_ip_default_route_and_quotes() {
        let csv = "# c\n\n network , country,region,city,latitude,longitude \n\
                   0.0.0.0/0,ZZ,,,0,0\n192.0.2.9,cn,\"Beijing\",\"Beijing\",39.9,116.4\n\
                   2001:db8::9,CN,Zhejiang,Hangzhou,30.27,120.15\n";
        let db = GeoDb::from_csv(csv, "t.csv").expect("valid");
        assert_eq!(
            db.lookup(ip("192.0.2.9"))
                .map(|l| l.country.clone())
                .as_deref(),
            Some("CN")
        );
        assert_eq!(city(&db, "192.0.2.9").as_deref(), Some("Beijing"));
        assert_eq!(
            db.lookup(ip("192.0.2.10"))
                .map(|l| l.country.clone())
                .as_deref(),
            Some("ZZ")
        );
        assert_eq!(city(&db, "2001:db8::9").as_deref(), Some("Hangzhou"));
        assert_eq!(db.lookup(ip("2001:db8::a")), None);
    }

    #[test]
    fn bad_csv_reports_every_bad_line() {
        let csv = "network,country,region,city,latitude,longitude\n\
                   192.0.2.0/24,CN,Beijing,Beijing,39.9,116.4\n\
                   192.0.2.0/33,CN,Beijing,Beijing,39.9,116.4\n\
                   # comment\n\
                   198.51.100.0/24,CN,Beijing,Beijing,north,116.4\n\
                   203.0.113.0/24,CN,Beijing\n\
                   192.0.2.7/24,CN,Beijing,Beijing,39.9,116.4\n\
                   203.0.113.0/24,,Beijing,Beijing,39.9,116.4\n\
                   203.0.113.0/24,CN,x,y,91,0\n";
        let err = GeoDb::from_csv(csv, "bad.csv").expect_err("must fail");
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        let prefixes: Vec<&str> = lines
            .iter()
            .map(|l| l.splitn(3, ':').take(2).last().unwrap_or(""))
            .collect();
        assert_eq!(prefixes, ["3", "5", "6", "7", "8", "9"], "{text}");
        assert!(lines.iter().all(|l| l.starts_with("bad.csv:")), "{text}");
        assert!(
            lines[1].contains("latitude") && lines[2].contains("6 fields"),
            "{text}"
        );
        assert!(
            lines[3].contains("duplicate") && lines[3].contains("line 2"),
            "{text}"
        );
        assert!(
            lines[4].contains("country") && lines[5].contains("latitude"),
            "{text}"
        );
    }

    #[test]
    fn bad_header() {
        for (csv, line) in [
            ("# x\nnet,country,region,city,lat,lon\n", 2),
            ("", 1),
            ("# only\n", 1),
        ] {
            match GeoDb::from_csv(csv, "h.csv") {
                Err(GeoError::Header { line: l, .. }) => assert_eq!(l, line, "{csv:?}"),
                other => panic!("{csv:?}: {other:?}"),
            }
        }
        let message = GeoDb::from_csv("a,b\n", "h.csv")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.starts_with("h.csv:1: bad header"), "{message}");
    }

    #[test]
    fn open_dispatches_on_extension() {
        let dir = tempfile::tempdir().expect("tempdir");
        let csv = dir.path().join("g.csv");
        std::fs::write(&csv, include_str!("../geo/demo.csv")).expect("write");
        let db = GeoDb::open(&csv).expect("opens csv");
        assert!(
            db.describe().ends_with("g.csv (10 networks)"),
            "{}",
            db.describe()
        );
        let missing = dir.path().join("nope.csv");
        assert!(matches!(GeoDb::open(&missing), Err(GeoError::Io { .. })));
        let junk = dir.path().join("junk.mmdb");
        std::fs::write(&junk, b"not an mmdb").expect("write");
        assert!(matches!(GeoDb::open(&junk), Err(GeoError::Mmdb { .. })));
        assert!(matches!(
            GeoDb::open(&dir.path().join("x.tar.gz")),
            Err(GeoError::UnknownExtension { .. })
        ));
    }

    #[test]
    fn distance_beijing_shanghai() {
        let d = distance_km(39.9042, 116.4074, 31.2304, 121.4737);
        assert!((d - 1067.0).abs() < 1067.0 * 0.02, "{d}");
        assert_eq!(distance_km(30.0, 120.0, 30.0, 120.0), 0.0);
        assert!(distance_km(f64::NAN, 0.0, 0.0, 0.0).is_nan());
        assert!(distance_km(f64::NAN, 0.0, f64::NAN, 0.0).is_nan());
        assert!(distance_km(0.0, f64::INFINITY, 0.0, f64::INFINITY).is_nan());
        assert!(distance_km(f64::INFINITY, 0.0, f64::INFINITY, 0.0).is_nan());
        let zero = distance_km(-0.0, 0.0, 0.0, -0.0);
        assert!(zero == 0.0 && zero.is_sign_positive(), "{zero}");
    }

    #[test]
    fn region_key_is_stable() {
        let key = |country: &str, region: &str| {
            Location::new(country.into(), region.into(), "x".into(), 0.0, 0.0).region_key
        };
        // A literal, so any change of hash (which would orphan stored profiles) fails here.
        assert_eq!(key("CN", "Beijing"), 0xa427_6baa_7354_67f1);
        assert_eq!(key("CN", "Guangdong"), key("CN", "Guangdong"));
        // The separator keeps ("CNG", "uangdong") apart from ("CN", "Guangdong").
        assert_ne!(key("CN", "Guangdong"), key("CNG", "uangdong"));
    }

    #[test]
    fn civil_date_matches_known_days() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(951_782_400), (2000, 2, 29));
        assert_eq!(civil_date(1_781_725_941), (2026, 6, 17));
    }

    #[test]
    fn geodb_is_send_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<GeoDb>();
    }
}
