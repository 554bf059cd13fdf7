//! The command line: exit codes, messages, offline PKI, and the demo.

use std::os::unix::fs::PermissionsExt;

use crate::{meshnode, meshnode_bin};
use std::process::{Command, Stdio};

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_bad_config_exits_64_and_names_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "mesh = \"acme\"\nclustr = \"east\"\nbind = \"nowhere\"\n",
    )
    .unwrap();
    for cmd in ["validate", "run"] {
        let out = meshnode(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {}", text(&out));
        assert!(text(&out).contains("clustr: unknown key"), "{}", text(&out));
    }
    std::fs::write(
        &cfg,
        "mesh = \"acme\"\nbind = \"nowhere\"\n[[service]]\nname = \"a\"\nport = 0\n",
    )
    .unwrap();
    let out = meshnode(&["validate", "--config", cfg.to_str().unwrap()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(64));
    for key in ["cluster:", "bind:", "service[0].port:"] {
        assert!(t.contains(key), "missing {key} in {t}");
    }
}

#[test]
fn a_bad_log_format_is_a_usage_error_from_the_config_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "mesh = \"acme\"\ncluster = \"east\"\nnode = \"n1\"\nlog_format = \"xml\"\n",
    )
    .unwrap();
    let out = meshnode(&["validate", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("log_format: \"xml\" is not a log format"),
        "{}",
        text(&out)
    );
    std::fs::write(
        &cfg,
        "mesh = \"acme\"\ncluster = \"east\"\nnode = \"n1\"\nlog_format = \"json\"\n",
    )
    .unwrap();
    let out = meshnode(&["validate", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = std::process::Command::new(crate::meshnode_bin())
        .args(["validate", "--config", cfg.to_str().unwrap()])
        .env("MESHNODE_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("MESHNODE_LOG_FORMAT=\"yaml\" is not a log format"),
        "{}",
        text(&out)
    );
}

#[test]
fn validate_json_says_valid_or_lists_every_error_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "mesh = \"acme\"\nclustr = \"east\"\n").unwrap();
    let out = meshnode(&["validate", "--json", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(out.stderr.is_empty(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"][0]["key"], "clustr", "{v}");

    std::fs::write(&cfg, "mesh = \"acme\"\ncluster = \"east\"\nnode = \"n1\"\n").unwrap();
    let out = meshnode(&["validate", "--json", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["node"], "n1");
    assert!(
        v["notes"][0]
            .as_str()
            .unwrap()
            .contains("does not exist yet"),
        "{v}"
    );

    let out = meshnode(&["validate", "--json", "--config", "/nonexistent.toml"]);
    assert_eq!(out.status.code(), Some(64));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("No such file"),
        "{v}"
    );
}

#[test]
fn a_toml_syntax_error_names_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "mesh = \"acme\"\ncluster = \"east\"\nbind = 127.0.0.1:9470\n",
    )
    .unwrap();
    let out = meshnode(&["validate", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).contains("line 3, column"), "{}", text(&out));
}

#[test]
fn usage_errors_exit_64() {
    assert_eq!(meshnode(&["frobnicate"]).status.code(), Some(64));
    assert_eq!(
        meshnode(&["cert", "issue", "--ca", "/nonexistent"])
            .status
            .code(),
        Some(64)
    );
    assert_eq!(meshnode(&["--help"]).status.code(), Some(0));
}

/// `meshnode cert issue` of node `node` in cluster east from the CA in `ca`.
fn issue(
    ca: &std::path::Path,
    node: &str,
    out: &std::path::Path,
    gateway: bool,
) -> std::process::Output {
    let (ca, out) = (ca.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec![
        "cert",
        "issue",
        "--ca",
        ca,
        "--cluster",
        "east",
        "--node",
        node,
        "--out",
        out,
    ];
    if gateway {
        args.push("--gateway");
    }
    meshnode(&args)
}

#[test]
fn ca_init_and_cert_issue_write_private_keys_0600_and_run_refuses_a_readable_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let node = dir.path().join("n1");
    let out = meshnode(&[
        "ca",
        "init",
        "--mesh",
        "acme",
        "--out",
        ca.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = issue(&ca, "n1", &node, true);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("spiffe://acme/cluster/east/node/n1 (gateway)"),
        "{}",
        text(&out)
    );
    for key in [ca.join("ca.key"), node.join("node.key")] {
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // Issuing into the same place again must not overwrite the key.
    let again = issue(&ca, "n1", &node, false);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("refusing to overwrite"),
        "{}",
        text(&again)
    );

    std::fs::set_permissions(
        node.join("node.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let cfg = dir.path().join("n1.toml");
    std::fs::write(
        &cfg,
        format!("node = \"n1\"\ncluster = \"east\"\nmesh = \"acme\"\ndata_dir = \"{}\"\nbind = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n", node.display()),
    )
    .unwrap();
    // `validate` refuses what `run` refuses, with the same message.
    for cmd in ["validate", "run"] {
        let out = meshnode(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {}", text(&out));
        assert!(text(&out).contains("chmod 600"), "{cmd}: {}", text(&out));
    }

    // A config whose identity disagrees with the certificate is refused, naming the key.
    std::fs::set_permissions(
        node.join("node.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("cluster = \"east\"", "cluster = \"west\""),
    )
    .unwrap();
    for cmd in ["validate", "run"] {
        let out = meshnode(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {}", text(&out));
        assert!(
            text(&out).contains("cluster: config says \"west\""),
            "{cmd}: {}",
            text(&out)
        );
    }

    // gateway = true needs a gateway certificate.
    let plain = dir.path().join("n2");
    let out = issue(&ca, "n2", &plain, false);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(
        &cfg,
        format!("node = \"n2\"\ncluster = \"east\"\nmesh = \"acme\"\ndata_dir = \"{}\"\nbind = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ngateway = true\n", plain.display()),
    )
    .unwrap();
    for cmd in ["validate", "run"] {
        let out = meshnode(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {}", text(&out));
        assert!(text(&out).contains("--gateway"), "{cmd}: {}", text(&out));
    }
    // And a config that validates does start: n2 without `gateway`.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("gateway = true\n", ""),
    )
    .unwrap();
    let out = meshnode(&["validate", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("valid (node n2"), "{}", text(&out));
}

/// A key only its owner may read, read by another user: the OS error once,
/// with a hint about ownership. Needs root (to run the command as nobody).
#[test]
fn a_key_of_another_user_is_refused_once_with_a_hint() {
    if !nix_is_root() {
        eprintln!("skipped: needs root to run meshnode as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = dir.path().join("ca");
    let node = dir.path().join("n1");
    assert!(meshnode(&[
        "ca",
        "init",
        "--mesh",
        "acme",
        "--out",
        ca.to_str().unwrap()
    ])
    .status
    .success());
    assert!(issue(&ca, "n1", &node, false).status.success());
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = dir.path().join("n1.toml");
    std::fs::write(
        &cfg,
        format!("node = \"n1\"\ncluster = \"east\"\nmesh = \"acme\"\ndata_dir = \"{}\"\nbind = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n", node.display()),
    )
    .unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(crate::meshnode_bin())
        .args(["validate", "--config", cfg.to_str().unwrap()])
        .output()
        .expect("setpriv (util-linux)");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(64), "{t}");
    assert_eq!(t.matches("Permission denied").count(), 1, "{t}");
    assert!(t.contains("hint: the file belongs to another user"), "{t}");
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn admin_commands_explain_an_unreachable_agent() {
    let out = meshnode(&["members", "--admin", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("is the agent running?"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_example_config_validates() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/meshnode.example.toml"
    );
    let out = meshnode(&["validate", "--config", example]);
    assert!(out.status.success(), "{}", text(&out));
    // As shipped it is a lone first node: no seeds, services or upstreams
    // that a new user would carry into every catalog by accident.
    assert!(
        text(&out).contains("0 service(s), 0 upstream(s)"),
        "{}",
        text(&out)
    );
    // Its commented examples are valid once uncommented.
    let keys = [
        "seeds",
        "[[service]]",
        "name",
        "address",
        "port",
        "protocol",
        "tags",
        "check",
        "[[upstream]]",
        "service",
        "listen",
        "failover",
    ];
    let uncommented: String = std::fs::read_to_string(example)
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if keys.iter().any(|k| rest.starts_with(k)) => format!("{rest}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.toml");
    std::fs::write(&full, uncommented).unwrap();
    let out = meshnode(&["validate", "--config", full.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("1 service(s), 1 upstream(s)"),
        "{}",
        text(&out)
    );
}

/// Runs `meshnode demo ARGS` with a temp dir of its own (so demos running
/// side by side cannot see each other's files) and checks it leaves nothing.
fn demo(args: &[&str]) -> (std::process::Output, String) {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(meshnode_bin())
        .arg("demo")
        .args(args)
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .output()
        .expect("running meshnode demo");
    let t = text(&out);
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "demo left {left:?}: {t}");
    (out, t)
}

#[test]
fn demo_exits_zero_and_leaves_no_files() {
    let (out, t) = demo(&[]);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("kill -9 detected"), "{t}");
}

#[test]
fn demo_http_moves_a_canary_by_policy_apply() {
    let (out, t) = demo(&["--http"]);
    assert!(out.status.success(), "{t}");
    // The summary table: one row per phase, v2's share following each document.
    for phase in ["canary 0 %", "canary 10 %", "canary 50 %", "canary 100 %"] {
        assert!(
            t.lines().any(|l| l.starts_with(phase)),
            "no {phase:?} row: {t}"
        );
    }
    // PHASE (3 words) OK FAILED V1 V2 SHARE: the counts of one phase.
    let counts = |phase: &str| -> Vec<String> {
        let row = t.lines().find(|l| l.starts_with(phase)).unwrap_or_default();
        row.split_whitespace()
            .skip(3)
            .take(4)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(counts("canary 100 %"), ["200", "0", "0", "200"], "{t}");
    assert_eq!(counts("canary 0 %"), ["200", "0", "200", "0"], "{t}");
    assert!(t.contains("the v2 share followed each document"), "{t}");
    // The resilience act: one summary row per mechanism, with the mesh's
    // counts (the demo itself fails when a count is off).
    for act in ["breaker ", "retries ", "rate limit ", "fault "] {
        assert!(t.lines().any(|l| l.starts_with(act)), "no {act:?} row: {t}");
    }
    assert!(t.contains("503 circuit_open max_requests"), "{t}");
    assert!(t.contains("429 rate_limited"), "{t}");
    assert!(t.contains("503 fault abort"), "{t}");
    let retried = t
        .lines()
        .find(|l| l.trim_start().starts_with("with retries:"))
        .unwrap_or_default();
    assert!(
        retried.contains("retries, meshnode_http_retries_total"),
        "{t}"
    );
}

/// Runtime worker threads of a running process (tokio names them `tokio-rt-worker`).
fn runtime_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| t.ok())
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .filter(|comm| comm.trim_end() == "tokio-rt-worker")
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_workers_key_sets_the_agent_runtime_threads() {
    let pki = crate::Pki::new();
    for (workers, line) in [(1, ""), (3, "workers = 3\n")] {
        let spec = crate::NodeSpec::new(crate::subnet(), 1 + workers as u8, &format!("w{workers}"));
        let dir = pki.issue(&spec.cluster, &spec.name);
        let cfg = dir.join("config.toml");
        std::fs::write(&cfg, format!("{line}{}", spec.config(&dir))).unwrap();
        let node = crate::NodeProc::spawn(
            spec,
            vec!["run".into(), "--config".into(), cfg.into_os_string()],
            &dir.join("node.log"),
        );
        let up = crate::wait_until(std::time::Duration::from_secs(10), || async {
            node.get("/v1/health").await.is_some()
        })
        .await;
        assert!(up.is_some(), "node did not start: {}", node.log_text());
        let pid = node.child.as_ref().map(|c| c.id()).unwrap();
        assert_eq!(runtime_workers(pid), workers, "{}", node.log_text());
    }
}

/// A check that never passed says why: once in the log, in the node's
/// status warnings, and on every node's `endpoints` (the reason and since
/// when travel in gossip, `chk:` keys).
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_check_says_why_in_the_log_the_status_and_endpoints_everywhere() {
    use std::time::Duration;
    let pki = crate::Pki::new();
    let net = crate::subnet();
    // Nothing listens there.
    let dead = crate::free_tcp(std::net::Ipv4Addr::new(127, net[0], net[1], 1));
    let svc = format!(
        "\n[[service]]\nname = \"api\"\naddress = \"{}\"\nport = {}\ncheck = {{ tcp = \"{dead}\", interval = \"200ms\", timeout = \"150ms\" }}\n",
        dead.ip(),
        dead.port()
    );
    let nodes = super::start_pool(&pki, net, vec![svc, String::new()]).await;
    let warned = crate::wait_until(Duration::from_secs(10), || async {
        nodes[0]
            .get("/v1/status")
            .await
            .is_some_and(|s| s["warnings"].to_string().contains("service api (port"))
    })
    .await;
    let status = nodes[0].get("/v1/status").await.expect("status");
    assert!(warned.is_some(), "{status}");
    let warnings = status["warnings"].to_string().to_lowercase();
    assert!(
        warnings.contains("is critical") && warnings.contains("refused"),
        "{warnings}"
    );
    // The other node shows the reason and since when.
    let shown = crate::wait_until(Duration::from_secs(10), || async {
        nodes[1].get("/v1/services").await.is_some_and(|v| {
            v["api"][0]["check"]["output"]
                .as_str()
                .is_some_and(|o| o.to_lowercase().contains("refused"))
        })
    })
    .await;
    assert!(shown.is_some(), "{:?}", nodes[1].get("/v1/services").await);
    let admin = nodes[1].spec.admin.to_string();
    let out = meshnode(&["endpoints", "api", "--admin", &admin]);
    let table = text(&out);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains("CHECK") && table.contains("SINCE"),
        "{table}"
    );
    assert!(
        table.to_lowercase().contains("refused") && table.contains(" ago"),
        "{table}"
    );
    let log = nodes[0].log_text();
    assert_eq!(
        log.matches("health check has not passed yet").count(),
        1,
        "{log}"
    );
}

/// `exec` checks: exit 0 passes, 1 warns, anything else fails (no shell
/// between: the program is run as given). `ttl` checks: the application
/// reports with `meshnode check`, authorized by its service's token; no
/// report within the ttl makes it critical.
#[tokio::test(flavor = "multi_thread")]
async fn exec_and_ttl_checks_follow_the_program_and_the_applications_reports() {
    use std::time::Duration;
    let pki = crate::Pki::new();
    let net = crate::subnet();
    let work = tempfile::tempdir().expect("tempdir");
    let code = work.path().join("code");
    std::fs::write(&code, "1").expect("code");
    let ip = std::net::Ipv4Addr::new(127, net[0], net[1], 1);
    let svc = format!(
        "\n[[service]]\nname = \"batch\"\naddress = \"{ip}\"\nport = 7001\ncheck = {{ exec = [\"/bin/sh\", \"-c\", \"echo disk at 91%; exit $(cat {})\"], interval = \"300ms\", timeout = \"250ms\" }}\n\n[[service]]\nname = \"worker\"\naddress = \"{ip}\"\nport = 7002\ncheck = {{ ttl = \"2s\" }}\n",
        code.display()
    );
    let nodes = super::start_pool(&pki, net, vec![svc]).await;
    let node = &nodes[0];
    let health = |svc: &'static str| async move {
        node.instances(svc)
            .await
            .first()
            .map(|(_, h)| h.clone())
            .unwrap_or_default()
    };
    let output = |svc: &'static str| async move {
        node.get("/v1/services")
            .await
            .and_then(|v| v[svc][0]["check"]["output"].as_str().map(String::from))
    };
    // exec: exit 1 is a warning, with the program's output.
    let ok = crate::wait_until(Duration::from_secs(10), || async {
        health("batch").await == "warning"
    })
    .await;
    assert!(ok.is_some(), "{:?}", node.get("/v1/services").await);
    assert_eq!(output("batch").await.as_deref(), Some("disk at 91%"));
    std::fs::write(&code, "0").expect("code");
    let ok = crate::wait_until(Duration::from_secs(10), || async {
        health("batch").await == "passing"
    })
    .await;
    assert!(ok.is_some(), "exit 0 did not pass");
    std::fs::write(&code, "2").expect("code");
    let ok = crate::wait_until(Duration::from_secs(10), || async {
        health("batch").await == "critical"
    })
    .await;
    assert!(ok.is_some(), "exit 2 did not fail");
    assert!(output("batch")
        .await
        .is_some_and(|o| o.starts_with("exit 2")));

    // ttl: critical until the application reports.
    assert_eq!(health("worker").await, "critical");
    let admin = node.spec.admin.to_string();
    let data = node.data_dir();
    let data = data.to_str().expect("path");
    let report = |status: &str, extra: &[&str]| {
        let mut args = vec![
            "check",
            status,
            "worker",
            "--admin",
            &admin,
            "--data-dir",
            data,
        ];
        args.extend_from_slice(extra);
        meshnode(&args)
    };
    let out = report("pass", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let ok = crate::wait_until(Duration::from_secs(5), || async {
        health("worker").await == "passing"
    })
    .await;
    assert!(ok.is_some(), "a pass report did not pass");
    let out = report("warn", &["--note", "queue at 80%"]);
    assert!(out.status.success(), "{}", text(&out));
    let ok = crate::wait_until(Duration::from_secs(5), || async {
        health("worker").await == "warning"
            && output("worker").await.as_deref() == Some("queue at 80%")
    })
    .await;
    assert!(ok.is_some(), "{:?}", node.get("/v1/services").await);
    // No report within the ttl: critical, and the status says why.
    let ok = crate::wait_until(Duration::from_secs(6), || async {
        health("worker").await == "critical"
    })
    .await;
    assert!(ok.is_some(), "the ttl did not expire");
    let st = node.get("/v1/status").await.expect("status");
    assert!(
        st["warnings"]
            .to_string()
            .contains("no report within the ttl"),
        "{st}"
    );
    // A wrong token is refused; the token file is 0640.
    let bad = work.path().join("bad.token");
    std::fs::write(&bad, "nope").expect("token");
    let out = report("pass", &["--token-file", bad.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("wrong token"), "{}", text(&out));
    let mode = std::fs::metadata(node.data_dir().join("checks/worker.token"))
        .expect("token file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640);
    // A service without a ttl check takes no reports.
    let out = meshnode(&[
        "check",
        "pass",
        "batch",
        "--admin",
        &admin,
        "--token-file",
        bad.to_str().expect("path"),
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
}

#[test]
fn completions_and_man_pages_come_from_the_command_line() {
    for shell in ["bash", "zsh", "fish"] {
        let out = meshnode(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        for sub in ["join", "reload", "explain", "policy"] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let out = meshnode(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man1");
    let out = meshnode(&["man", "--out", pages.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let main = std::fs::read_to_string(pages.join("meshnode.1")).unwrap();
    assert!(
        main.starts_with(".ie") || main.contains(".TH meshnode"),
        "{main}"
    );
    let join = std::fs::read_to_string(pages.join("meshnode-join.1")).unwrap();
    assert!(
        join.contains("wan\\-seed"),
        "join's page lacks --wan-seed: {join}"
    );
}
