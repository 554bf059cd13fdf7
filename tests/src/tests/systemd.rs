//! The agent as a systemd service: the notify protocol without a running
//! systemd (a datagram socket stands in), and the unit file checked offline.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::{subnet, NodeSpec, Pki};

/// Collects notify messages until `until` matches one or `limit` passes.
fn read_until(sock: &UnixDatagram, limit: Duration, until: &str) -> Vec<String> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.contains(until);
            got.push(msg);
            if done {
                break;
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_speaks_sd_notify_ready_watchdog_and_stopping() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");

    let net = subnet();
    let spec = NodeSpec::new(net, 1, "node-1");
    let admin = spec.admin;
    let data = pki.issue(&spec.cluster, "node-1");
    std::fs::write(data.join("config.toml"), spec.config(&data)).expect("config");
    let mut child = std::process::Command::new(crate::meshnode_bin())
        .args(["run", "--config"])
        .arg(data.join("config.toml"))
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();

    let got = read_until(&sock, Duration::from_secs(10), "READY=1");
    assert!(got.iter().any(|m| m.contains("READY=1")), "{got:?}");
    // READY means joined: the admin API says so too.
    let health = crate::http_get(admin, "/v1/health")
        .await
        .unwrap_or_default();
    assert!(health.contains("ok"), "{health}");
    // Pings at half of WATCHDOG_USEC: several within a second.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(1) {
        pings += read_until(&sock, Duration::from_millis(300), "WATCHDOG=1")
            .iter()
            .filter(|m| m.contains("WATCHDOG=1"))
            .count();
    }
    assert!(pings >= 3, "only {pings} watchdog pings in 1 s");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let got = read_until(&sock, Duration::from_secs(5), "STOPPING=1");
    assert!(got.iter().any(|m| m.contains("STOPPING=1")), "{got:?}");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

/// `systemd-analyze verify` (any output is a failure: it exits 0 on parse errors)
/// and the offline security score.
#[test]
fn the_unit_file_verifies_and_is_hardened() {
    let have = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var("CI").ok().as_deref() != Some("true"),
            "systemd-analyze is required under CI=true (.ci/run installs systemd)"
        );
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/meshnode.service"),
    )
    .expect("deploy/meshnode.service");
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    assert!(
        unit.contains("ExecReload=/bin/kill -HUP $MAINPID"),
        "systemctl reload must send SIGHUP (the agent reloads its config on it)"
    );
    // verify checks that ExecStart's binary exists: point it at the one we built.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meshnode.service");
    let bin = crate::meshnode_bin();
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/meshnode", &bin.display().to_string()),
    )
    .expect("write unit");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze verify");
    let noise =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && noise.trim().is_empty(),
        "verify: {noise}"
    );
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(&path)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for meshnode.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::MAX);
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(out.status.success() && score <= 2.0, "{text}");
}

/// `sudo bash deploy/install.sh ./meshnode`, as the README says, from the
/// directory holding the binary, into a scratch root: every file in place
/// with its mode and owner, and the example config validated.
#[test]
fn the_install_script_takes_a_relative_binary_and_installs_into_a_scratch_root() {
    let root_user = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")));
    let have = std::process::Command::new("systemd-sysusers")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !root_user || !have {
        assert!(
            std::env::var("CI").ok().as_deref() != Some("true"),
            "the install test needs root and systemd-sysusers under CI=true"
        );
        eprintln!("SKIPPED: needs root and systemd-sysusers");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let work = tempfile::tempdir().expect("tempdir");
    let here = work.path().join("download");
    let root = work.path().join("root");
    std::fs::create_dir_all(&here).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(crate::meshnode_bin(), here.join("meshnode")).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("./meshnode")
        .current_dir(&here)
        .env("ROOT", &root)
        .output()
        .expect("bash");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("meshnode.example.toml: valid"), "{text}");
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}\n{text}"))
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("usr/local/bin/meshnode"), 0o755);
    assert_eq!(mode("etc/systemd/system/meshnode.service"), 0o644);
    assert_eq!(mode("etc/meshnode/meshnode.example.toml"), 0o644);
    assert_eq!(mode("var/lib/meshnode"), 0o700);
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let uid: u32 = passwd
        .lines()
        .find_map(|l| l.strip_prefix("meshnode:"))
        .and_then(|rest| rest.split(':').nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no meshnode user in the scratch root: {passwd}"));
    assert_eq!(
        std::fs::metadata(root.join("var/lib/meshnode"))
            .unwrap()
            .uid(),
        uid
    );
    // systemd on this machine is not asked to reload for a scratch root.
    assert!(!text.contains("daemon-reload"), "{text}");
}
