//! The `riskgate` binary: `check` on good and broken packs, and `serve`
//! starting on the shipped pack and stopping cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::copy_dir;

const BIN: &str = env!("CARGO_BIN_EXE_riskgate");

/// Kills a spawned server when a test fails half-way, so no orphan keeps
/// the test harness's pipes open.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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

[[rules]]
id = "c"
file = "c.rhai"

[limits]
max_operations = 0
max_string_size = 100000000

[windows.blink]
key = ["user_id"]
aggregate = "count"
span = "500ms"

[windows.eon]
key = ["device_id"]
aggregate = "count"
span = "32d"
"#,
    )
    .unwrap();
    std::fs::write(
        d.join("a.rhai"),
        "if window.per_usr > param.limit {\n  blok(\"X\", \"y\")\n}\n",
    )
    .unwrap();
    std::fs::write(d.join("b.rhai"), "let x = ;\n").unwrap();
    std::fs::write(
        d.join("c.rhai"),
        "if request.amount > 100 {\n  block(\"burst-freq\", \"x\")\n} else {\n  flag(\"ONLY_A_CODE\")\n}\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("check").arg(d).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for expected in [
        "pack.toml:9:1: window `broken`: unknown key field `user_name`",
        "pack.toml:9:1: window `broken`: span `ten minutes`",
        "lists/ips.txt:2:1:",
        "pack.toml:22:1: duplicate rule id `a`",
        "a.rhai:1:11: unknown window `per_usr`",
        "a.rhai:2:3: unknown function `blok`",
        "b.rhai:1:9:",
        "pack.toml:31:1: limits.max_operations must be from 1 to 1000000, not 0",
        "pack.toml:32:1: limits.max_string_size must be from 256 to 1048576, not 100000000",
        "pack.toml:34:1: window `blink`: span is shorter than 1 second",
        "pack.toml:39:1: window `eon`: span is longer than 31 days",
        "c.rhai:2:3: code `burst-freq` must be UPPER_SNAKE_CASE",
        "c.rhai:4:3: `flag` takes a code and a message",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
    assert!(stdout.contains("13 problem(s)"), "{stdout}");
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
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut reaper = Reaper(child);
    let child = &mut reaper.0;
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

#[test]
fn test_passes_the_shipped_scenarios() {
    let out = Command::new(BIN)
        .args(["test", "rules"])
        .current_dir(repo())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let last = stdout.lines().last().unwrap();
    assert!(last.ends_with(" passed, 0 failed"), "{stdout}");
    // Every shipped rule has a scenario file of its own.
    let manifest = std::fs::read_to_string(repo().join("rules/pack.toml")).unwrap();
    for id in manifest.lines().filter_map(|l| l.strip_prefix("id = \"")) {
        let id = id.trim_end_matches('"');
        assert!(
            repo().join(format!("rules/tests/{id}.toml")).is_file(),
            "no scenario for {id}"
        );
        assert!(
            stdout.contains(&format!("ok   {id}.toml")),
            "{id}: {stdout}"
        );
    }
}

#[test]
fn test_fails_a_wrong_expectation_with_a_readable_diff() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("rules"), dir.path());
    std::fs::write(
        dir.path().join("tests/wrong.toml"),
        "name = \"a deliberately wrong expectation\"\n\
         [[steps]]\nat = \"0s\"\nevaluate = { id = \"big\", yuan = 5000, real_name_verified = false }\n\
         expect = { action = \"allow\", codes = [] }\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("test")
        .arg(dir.path())
        .current_dir(repo())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for expected in [
        "FAIL wrong.toml: a deliberately wrong expectation",
        "step 1 (at +0h00m00s, evaluate big):",
        "action:    expected allow, got block",
        "codes:     expected [], got [\"REAL_NAME_REQUIRED\"]",
        " passed, 1 failed",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
}

#[test]
fn sighup_reloads_the_pack() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("rules"), dir.path());
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--no-watch", "--rules"])
        .arg(dir.path())
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let mut reaper = Reaper(child);
    let child = &mut reaper.0;
    assert!(lines.by_ref().any(|l| l.contains("serving")));
    let manifest = std::fs::read_to_string(dir.path().join("pack.toml")).unwrap();
    std::fs::write(
        dir.path().join("pack.toml"),
        manifest.replace("max_travel_kmh = 1000 ", "max_travel_kmh = 1001 "),
    )
    .unwrap();
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let reloaded = lines
        .by_ref()
        .find(|l| l.contains("rule pack reloaded"))
        .expect("reload logged");
    assert!(reloaded.contains("trigger=\"sighup\""), "{reloaded}");
    // A broken pack on SIGHUP is refused, and the server keeps running.
    std::fs::write(dir.path().join("duplicate.rhai"), "if {").unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let refused = lines
        .by_ref()
        .find(|l| l.contains("rule pack refused"))
        .expect("refusal logged");
    assert!(refused.contains("duplicate.rhai:1:"), "{refused}");
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(child.wait().unwrap().success());
}
