//! Snapshots of the in-memory store, through the real binary: state
//! survives a graceful restart and a kill -9 (up to the last periodic
//! snapshot), and a truncated snapshot is refused unless the operator asks
//! to start empty.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use riskgate::pb;
use riskgate::pb::risk_engine_client::RiskEngineClient;

mod common;

use common::{action, codes, recharge, MIN};

const BIN: &str = env!("CARGO_BIN_EXE_riskgate");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A `riskgate serve` process; killed when dropped (a failing test leaves
/// no orphan), its stderr lines collected by a thread.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(snapshot: &Path, extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-watch",
            "--snapshot",
        ])
        .arg(snapshot)
        .args(extra)
        .current_dir(repo())
        .env("RUST_LOG", "riskgate=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

impl Server {
    fn start(snapshot: &Path, extra: &[&str]) -> Server {
        let (child, lines) = spawn(snapshot, extra);
        let mut server = Server {
            child,
            lines,
            seen: Vec::new(),
            addr: String::new(),
        };
        let serving = server.wait_for(|l| l.contains("riskgate serving"));
        let at = serving.find("127.0.0.1:").expect("address in the log");
        server.addr = serving[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        server
    }

    /// The first stderr line (from now on) that `want` accepts.
    fn wait_for(&mut self, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("not logged in time; the log so far:\n{:#?}", self.seen),
            }
        }
    }

    async fn client(&self) -> RiskEngineClient<tonic::transport::Channel> {
        RiskEngineClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    /// SIGTERM, then waits for a clean exit; returns the rest of the log.
    fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut rest = std::mem::take(&mut self.seen);
        rest.extend(self.lines.iter());
        assert!(status.success(), "{status:?}: {rest:#?}");
        rest
    }
}

async fn eval(
    client: &mut RiskEngineClient<tonic::transport::Channel>,
    req: pb::EvaluateRequest,
) -> pb::Decision {
    client
        .evaluate(req)
        .await
        .unwrap_or_else(|s| panic!("evaluate: {s:?}"))
        .into_inner()
}

/// Four large (500 yuan) orders by `user`, one every 30 s up to now: the
/// next large one is the 5th within 10 minutes (BURST_FREQUENCY).
fn burst(user: &str, t0: i64) -> Vec<pb::EvaluateRequest> {
    (0..4)
        .map(|i| recharge(&format!("{user}-large-{i}"), user, 500, t0 + i * 30_000))
        .collect()
}

async fn record_burst(server: &Server, user: &str, t0: i64) {
    let mut client = server.client().await;
    for req in burst(user, t0) {
        let d = eval(&mut client, req).await;
        assert_eq!(action(&d), pb::Action::Allow, "{d:#?}");
    }
}

/// After a restart: a retried order replays (and does not count), and the
/// next large order is the 5th of the burst.
async fn burst_is_remembered(server: &Server, user: &str, t0: i64) {
    let mut client = server.client().await;
    let retry = burst(user, t0).remove(0);
    let again = eval(&mut client, retry).await;
    assert!(again.replayed, "{again:#?}");
    assert_eq!(action(&again), pb::Action::Allow);
    let fifth = recharge(&format!("{user}-large-4"), user, 500, t0 + 2 * MIN);
    let d = eval(&mut client, fifth).await;
    assert_eq!(action(&d), pb::Action::Block, "{d:#?}");
    assert_eq!(codes(&d), ["BURST_FREQUENCY"]);
    assert!(
        d.reasons[0].message.contains("(5 in 10 minutes)"),
        "the retry counted again: {d:#?}"
    );
}

fn snapshot_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("state.snap")
}

#[test]
fn an_unwritable_snapshot_path_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-folder").join("state.snap");
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-watch",
            "--snapshot",
        ])
        .arg(&path)
        .current_dir(repo())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("riskgate: snapshot "), "{stderr}");
    assert!(stderr.contains("no-such-folder"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_survives_a_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = snapshot_path(&dir);
    let t0 = riskgate::now_ms() - 5 * MIN;

    let first = Server::start(&path, &[]);
    assert!(
        first.seen.iter().any(|l| l.contains("no snapshot yet")),
        "{:#?}",
        first.seen
    );
    record_burst(&first, "u-burst", t0).await;
    let log = first.stop();
    let written = log
        .iter()
        .find(|l| l.contains("snapshot written"))
        .unwrap_or_else(|| panic!("{log:#?}"));
    assert!(written.contains("idempotency_records=4"), "{written}");
    assert!(path.is_file());

    let second = Server::start(&path, &[]);
    let loaded = second
        .seen
        .iter()
        .find(|l| l.contains("snapshot loaded"))
        .unwrap_or_else(|| panic!("{:#?}", second.seen))
        .clone();
    assert!(loaded.contains("idempotency_records=4"), "{loaded}");
    burst_is_remembered(&second, "u-burst", t0).await;
    // An outcome of a request decided before the restart finds it.
    let mut client = second.client().await;
    let outcome = client
        .report_outcome(pb::Outcome {
            request_id: "u-burst-large-1".into(),
            user_id: String::new(),
            kind: pb::OutcomeKind::Succeeded as i32,
            timestamp_ms: 0,
        })
        .await
        .expect("the decided request is known after the restart")
        .into_inner();
    assert!(!outcome.replayed);
    second.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_keeps_what_the_last_periodic_snapshot_saved() {
    let dir = tempfile::tempdir().unwrap();
    let path = snapshot_path(&dir);
    let t0 = riskgate::now_ms() - 5 * MIN;

    let mut first = Server::start(&path, &["--snapshot-interval", "1s"]);
    record_burst(&first, "u-kill", t0).await;
    first.wait_for(|l| l.contains("snapshot written") && l.contains("idempotency_records=4"));
    // No graceful stop: SIGKILL.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    drop(first);

    let second = Server::start(&path, &[]);
    assert!(
        second.seen.iter().any(|l| l.contains("snapshot loaded")),
        "{:#?}",
        second.seen
    );
    burst_is_remembered(&second, "u-kill", t0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_snapshot_is_refused_unless_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let path = snapshot_path(&dir);
    let t0 = riskgate::now_ms() - 5 * MIN;
    let first = Server::start(&path, &[]);
    record_burst(&first, "u-cut", t0).await;
    first.stop();
    let bytes = std::fs::read(&path).unwrap();
    let cut = &bytes[..bytes.len() / 2];
    std::fs::write(&path, cut).unwrap();

    // Refused: a non-zero exit with the reason and the way out.
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-watch",
            "--snapshot",
        ])
        .arg(&path)
        .current_dir(repo())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("snapshot {} is truncated", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("--discard-bad-snapshot"), "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), cut, "the file is left alone");

    // With --discard-bad-snapshot, but FILE.bad cannot be taken (a folder
    // with a file in it): no start, and the refused file is not replaced.
    let mut aside = path.clone().into_os_string();
    aside.push(".bad");
    std::fs::create_dir(&aside).unwrap();
    std::fs::write(std::path::Path::new(&aside).join("keep"), "x").unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--no-watch"])
        .args(["--discard-bad-snapshot", "--snapshot"])
        .arg(&path)
        .current_dir(repo())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A server that started anyway would serve until killed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot move the refused snapshot aside"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), cut, "the file is left alone");
    std::fs::remove_dir_all(&aside).unwrap();

    // With --discard-bad-snapshot: a loud warning, the file moved aside,
    // an empty start (the burst is forgotten).
    let server = Server::start(&path, &["--discard-bad-snapshot"]);
    let warned = server
        .seen
        .iter()
        .find(|l| l.contains("SNAPSHOT DISCARDED"))
        .unwrap_or_else(|| panic!("{:#?}", server.seen))
        .clone();
    assert!(warned.contains("WARN"), "{warned}");
    assert!(warned.contains("is truncated"), "{warned}");
    assert_eq!(std::fs::read(&aside).unwrap(), cut);
    let mut client = server.client().await;
    let fifth = recharge("u-cut-large-4", "u-cut", 500, t0 + 2 * MIN);
    let d = eval(&mut client, fifth).await;
    assert_eq!(action(&d), pb::Action::Allow, "{d:#?}");
    server.stop();
    // The next snapshot is a good one again.
    let store = riskgate::state::MemoryStore::new(Default::default());
    let loaded = store.load_snapshot(&path).unwrap();
    assert_eq!(loaded.idempotency_records, 1);
}
