//! `serve --pretouch`, through the real binary: the memory is resident
//! before the server answers, and stays resident under load, where the
//! allocator would otherwise give freed memory back within a second.
#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_riskgate");

const PRETOUCH_MIB: u64 = 192;

/// A `riskgate serve` process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts a server and waits until it serves.
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--no-watch"])
            .args(extra)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
            .env("RUST_LOG", "riskgate=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = Vec::new();
        let mut lines = stderr.lines().map_while(Result::ok);
        let serving = loop {
            match lines.next() {
                Some(line) if line.contains("riskgate serving") => break line,
                Some(line) => seen.push(line),
                None => panic!("the server stopped before serving: {seen:#?}"),
            }
        };
        // Keep draining stderr so that the server never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        let at = serving.find("127.0.0.1:").expect("address in the log");
        let addr = serving[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        Server { child, addr }
    }

    /// Anonymous memory resident in the server, in MiB.
    fn resident_mib(&self) -> u64 {
        self.kib("status", "RssAnon:") >> 10
    }

    /// Memory the server holds in transparent huge pages, in KiB (None
    /// where the kernel does not say: no smaps_rollup, as under gVisor).
    fn huge_kib(&self) -> Option<u64> {
        std::fs::metadata(format!("/proc/{}/smaps_rollup", self.child.id())).ok()?;
        Some(self.kib("smaps_rollup", "AnonHugePages:"))
    }

    /// A "NAME: N kB" line of /proc/PID/FILE.
    fn kib(&self, file: &str, name: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in /proc/PID/{file}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Two seconds of load from a thousand users: the store stays small, and
    /// the allocator frees and collects many times over.
    fn load(&self) {
        let out = Command::new(BIN)
            .args(["loadgen", "--addr", &self.addr])
            .args(["--duration", "2s", "--warmup", "0s", "--users", "1000"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

#[test]
fn pretouched_memory_is_resident_before_serving_and_stays_under_load() {
    let pretouch = format!("{PRETOUCH_MIB}MiB");
    let server = Server::start(&["--pretouch", &pretouch]);
    let before = server.resident_mib();
    assert!(before >= PRETOUCH_MIB, "{before} MiB resident at the start");
    server.load();
    let after = server.resident_mib();
    assert!(after >= PRETOUCH_MIB, "{after} MiB resident after load");

    // The same load without a pretouch holds far less: what stays above is
    // the pretouch kept, not the load's own memory.
    let plain = Server::start(&[]);
    let huge_at_start = plain.huge_kib();
    plain.load();
    let without = plain.resident_mib();
    assert!(without < PRETOUCH_MIB / 2, "{without} MiB resident without");

    // Huge pages only with the pretouch, where the system grants any:
    // without, the requests fault none in (what the start faulted before
    // `main` could refuse them stays, or shrinks where a purge splits it).
    if let (Some(at_start), Some(now)) = (huge_at_start, plain.huge_kib()) {
        assert!(
            now <= at_start,
            "huge pages under load: {at_start} -> {now} KiB"
        );
    }
    if let (true, Some(huge)) = (huge_pages_granted(), server.huge_kib()) {
        // Most of the pretouch; the start's page or two are far less.
        let want = (PRETOUCH_MIB << 10) / 4;
        assert!(huge >= want, "{huge} KiB of huge pages with a pretouch");
    }
}

/// Whether this system gives transparent huge pages to a process that asks
/// (`always` or `madvise`, not `never`).
fn huge_pages_granted() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|mode| !mode.contains("[never]"))
}

#[test]
fn a_bad_pretouch_is_refused_before_the_start() {
    for (size, says) in [
        ("1GB", "pretouch `1GB` is not a size"),
        ("1TiB", "more than the"),
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--pretouch", size])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{size}: {stderr}");
        assert!(stderr.contains(says), "{size}: {stderr}");
        assert!(!stderr.contains("riskgate serving"), "{size}: {stderr}");
    }
}
