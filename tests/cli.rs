//! The `riskgate` binary: `check` on good and broken packs, and `serve`
//! starting on the shipped pack and stopping cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_riskgate");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_accepts_the_shipped_pack() {
    let out = Command::new(BIN)
        .args(["check", "rules"])
        .current_dir(repo())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("ok, version"), "{stdout}");
}

#[test]
fn check_reports_every_problem_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("lists")).unwrap();
    std::fs::write(d.join("lists/ips.txt"), "10.0.0.0/8\n10.0.0.0/33\n").unwrap();
    std::fs::write(
        d.join("pack.toml"),
        r#"[params]
limit = 5

[windows.per_user]
key = ["user_id"]
aggregate = "count"
span = "10m"

[windows.broken]
key = ["user_name"]
aggregate = "count"
span = "ten minutes"

[lists.ips]
kind = "ip"
file = "lists/ips.txt"

[[rules]]
id = "a"
file = "a.rhai"

[[rules]]
id = "a"
file = "b.rhai"
"#,
    )
    .unwrap();
    std::fs::write(
        d.join("a.rhai"),
        "if window.per_usr > param.limit {\n  block(\"X\", \"y\")\n}\n",
    )
    .unwrap();
    std::fs::write(d.join("b.rhai"), "let x = ;\n").unwrap();
    let out = Command::new(BIN).arg("check").arg(d).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for expected in [
        "pack.toml:9:1: window `broken`: unknown key field `user_name`",
        "pack.toml:9:1: window `broken`: span `ten minutes`",
        "lists/ips.txt:2:1:",
        "pack.toml:22:1: duplicate rule id `a`",
        "a.rhai:1:11: unknown window `per_usr`",
        "b.rhai:1:9:",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
    assert!(stdout.contains("6 problem(s)"), "{stdout}");
}

#[test]
fn check_reports_manifest_syntax_errors_with_position() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pack.toml"), "[params]\nlimit = \n").unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.starts_with("pack.toml:2:"), "{stdout}");
}

#[test]
fn serve_starts_on_the_shipped_pack_and_stops_on_sigterm() {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(repo())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let serving = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("serving"))
        .expect("server logs that it is serving");
    assert!(serving.contains("127.0.0.1:"), "{serving}");
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

#[test]
fn serve_refuses_a_broken_pack_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pack.toml"),
        "[[rules]]\nid = \"r\"\nfile = \"r.rhai\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("r.rhai"), "if ( {").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--rules"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("r.rhai:1:"), "{stderr}");
}
