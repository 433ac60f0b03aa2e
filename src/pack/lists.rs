//! Block and allow lists: IP ranges (CIDR), user ids and device ids, one entry
//! per line in plain files inside the pack.

use std::net::IpAddr;

/// foldhash: lists are only read on the hot path (their entries come from
/// the pack, never from requests), so no flooding concern, and SipHash
/// cost more than the rest of a lookup.
type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

use ipnetwork::IpNetwork;

use super::Problem;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Ip,
    User,
    Device,
}

impl ListKind {
    pub fn parse(text: &str) -> Option<ListKind> {
        match text {
            "ip" => Some(ListKind::Ip),
            "user" => Some(ListKind::User),
            "device" => Some(ListKind::Device),
            _ => None,
        }
    }
}

/// One list, ready for membership tests.
#[derive(Debug)]
pub struct List {
    pub kind: ListKind,
    names: HashSet<String>,
    ranges: PrefixSet,
}

impl List {
    /// Parses a list file; every malformed line is reported.
    pub fn parse(kind: ListKind, text: &str, file: &str) -> Result<List, Vec<Problem>> {
        let mut list = List {
            kind,
            names: HashSet::default(),
            ranges: PrefixSet::default(),
        };
        let mut problems = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let entry = raw.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let col = raw.find(entry).unwrap_or(0) + 1;
            match kind {
                ListKind::Ip => match parse_network(entry) {
                    Some(net) => list.ranges.insert(net),
                    None => problems.push(Problem::at(
                        file,
                        n + 1,
                        col,
                        format!("`{entry}` is not an IP address or CIDR range"),
                    )),
                },
                ListKind::User | ListKind::Device => {
                    if entry.chars().any(char::is_whitespace) {
                        problems.push(Problem::at(
                            file,
                            n + 1,
                            col,
                            format!("`{entry}` has whitespace inside; one id per line"),
                        ));
                    } else {
                        list.names.insert(entry.to_string());
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(list)
        } else {
            Err(problems)
        }
    }

    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        self.ranges.contains(ip)
    }

    pub fn contains_name(&self, name: &str) -> bool {
        !name.is_empty() && !self.names.is_empty() && self.names.contains(name)
    }

    pub fn len(&self) -> usize {
        self.names.len() + self.ranges.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn parse_network(text: &str) -> Option<IpNetwork> {
    if let Ok(net) = text.parse::<IpNetwork>() {
        return Some(net);
    }
    text.parse::<IpAddr>().ok().map(IpNetwork::from)
}

/// IP ranges by prefix length: a lookup probes one hash set per length in use,
/// so a list of a million ranges costs the same as a list of ten.
#[derive(Debug, Default)]
struct PrefixSet {
    /// (prefix length in the 128-bit space, masked addresses), longest first.
    by_len: Vec<(u8, HashSet<u128>)>,
    len: usize,
}

impl PrefixSet {
    fn insert(&mut self, net: IpNetwork) {
        let (addr, len) = widen(net.network(), net.prefix());
        let masked = mask(addr, len);
        if !self.by_len.iter().any(|(l, _)| *l == len) {
            self.by_len.push((len, HashSet::default()));
            self.by_len.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        }
        if let Some((_, set)) = self.by_len.iter_mut().find(|(l, _)| *l == len) {
            if set.insert(masked) {
                self.len += 1;
            }
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let (addr, _) = widen(ip, 0);
        self.by_len
            .iter()
            .any(|(len, set)| set.contains(&mask(addr, *len)))
    }
}

/// Maps an address into one 128-bit space (IPv4 as IPv4-mapped IPv6) so one
/// structure serves both families; `prefix` is shifted to match.
fn widen(ip: IpAddr, prefix: u8) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), prefix + 96),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (u128::from(v4.to_ipv6_mapped()), prefix.max(96)),
            None => (u128::from(v6), prefix),
        },
    }
}

fn mask(addr: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        l if l >= 128 => addr,
        l => addr & (u128::MAX << (128 - l)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_ranges_match_by_prefix() {
        let list = List::parse(
            ListKind::Ip,
            "# blocked\n203.0.113.0/25\n198.51.100.7\n2001:db8:dead::/48  # a v6 range\n",
            "ip_block.txt",
        )
        .unwrap();
        assert_eq!(list.len(), 3);
        assert!(list.contains_ip("203.0.113.5".parse().unwrap()));
        assert!(!list.contains_ip("203.0.113.200".parse().unwrap()));
        assert!(list.contains_ip("198.51.100.7".parse().unwrap()));
        assert!(!list.contains_ip("198.51.100.8".parse().unwrap()));
        assert!(list.contains_ip("2001:db8:dead:1::1".parse().unwrap()));
        assert!(list.contains_ip("::ffff:203.0.113.5".parse().unwrap()));
    }

    #[test]
    fn malformed_lines_are_all_reported_with_positions() {
        let err = List::parse(
            ListKind::Ip,
            "10.0.0.0/8\n  300.1.2.3\nnot-an-ip\n",
            "ips.txt",
        )
        .unwrap_err();
        let text: Vec<String> = err.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2);
        assert!(text[0].starts_with("ips.txt:2:3:"), "{}", text[0]);
        assert!(text[1].starts_with("ips.txt:3:1:"), "{}", text[1]);
    }

    #[test]
    fn names_match_exactly() {
        let list = List::parse(ListKind::User, "u1\nvip-2 # comment\n", "users.txt").unwrap();
        assert!(list.contains_name("vip-2"));
        assert!(!list.contains_name("vip"));
        assert!(!list.contains_name(""));
    }
}
