use super::*;

const FULL: &str = r#"
node = "vm-east-1"
cluster = "east"
mesh = "acme"
data_dir = "/var/lib/meshnode"
bind = "0.0.0.0:9470"
advertise = "10.0.1.5:9470"
admin = "127.0.0.1:9471"
seeds = ["10.0.1.4:9470"]
gateway = false

[tls]
ca = "/var/lib/meshnode/ca.pem"
cert = "/var/lib/meshnode/node.pem"
key = "/var/lib/meshnode/node.key"

[[service]]
name = "api"
address = "127.0.0.1"
port = 8080
protocol = "http"
tags = ["version=v2"]
check = { http = "http://127.0.0.1:8080/healthz", interval = "2s", timeout = "1s" }

[[upstream]]
service = "db"
listen = "127.0.0.1:15432"
failover = ["west", "central"]
"#;

fn errors(text: &str) -> Vec<String> {
    match Config::from_toml_str(text) {
        Ok(_) => panic!("config should be rejected"),
        Err(LoadError::Invalid(errs)) => errs.into_iter().map(|e| e.to_string()).collect(),
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn design_contract_example_parses() {
    let c = Config::from_toml_str(FULL).unwrap();
    assert_eq!(c.node, "vm-east-1");
    assert_eq!(
        c.services[0].check.as_ref().unwrap().interval,
        Duration::from_secs(2)
    );
    assert_eq!(
        c.services[0].check.as_ref().unwrap().target,
        CheckTarget::Http("http://127.0.0.1:8080/healthz".into())
    );
    assert_eq!(c.upstreams[0].failover, vec!["west", "central"]);
    assert_eq!(c.gossip.interval, Duration::from_millis(250));
}

#[test]
fn tls_paths_default_to_the_data_dir() {
    let c = Config::from_toml_str("cluster = \"c\"\nmesh = \"m\"\ndata_dir = \"/d\"").unwrap();
    assert_eq!(c.tls.key, PathBuf::from("/d/node.key"));
}

#[test]
fn every_unknown_key_is_reported_with_its_path() {
    let errs = errors(
        "cluster = \"c\"\nmesh = \"m\"\nbnd = \"x\"\n[[service]]\nname = \"a\"\nport = 1\nprot = \"tcp\"\n",
    );
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].starts_with("bnd: unknown key"), "{errs:?}");
    assert!(
        errs[1].starts_with("service[0].prot: unknown key"),
        "{errs:?}"
    );
}

#[test]
fn all_semantic_errors_are_reported_at_once() {
    let errs = errors(
        r#"
mesh = "acme"
bind = "nowhere"
seeds = ["10.0.0.1:9470", "bad"]
[[service]]
name = "api"
port = 70000
check = { tcp = "127.0.0.1:1", interval = "soon", timeout = "1s" }
[[service]]
port = 80
protocol = "udp"
[[upstream]]
service = "db"
"#,
    );
    let keys: Vec<&str> = errs.iter().map(|e| e.split(':').next().unwrap()).collect();
    assert_eq!(
        keys,
        vec![
            "cluster",
            "bind",
            "seeds[1]",
            "service[0].port",
            "service[0].check.interval",
            "service[1].name",
            "service[1].protocol",
            "upstream[0].listen"
        ],
        "{errs:#?}"
    );
}

#[test]
fn type_errors_name_the_key() {
    let errs =
        errors("cluster = \"c\"\nmesh = \"m\"\n[[service]]\nname = \"a\"\nport = \"eighty\"\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("service[0].port:"), "{errs:?}");
}

#[test]
fn syntax_errors_are_reported_with_line_and_column_not_panicked() {
    let errs = errors("cluster = \n");
    assert_eq!(errs.len(), 1);
    let errs = errors("cluster = \"c\"\nmesh = \"m\"\n[[service]]\nname = \"a\"\nport = 80 80\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].contains("line 5, column"), "{errs:?}");
    let errs =
        errors("cluster = \"c\"\nmesh = \"m\"\n[[service]]\nname = \"a\"\nport = \"eighty\"\n");
    assert!(errs[0].contains("line 5, column 8"), "{errs:?}");
}

#[test]
fn wan_keys_need_a_gateway_and_timeouts_fit_intervals() {
    let errs = errors(
        r#"
cluster = "c"
mesh = "m"
wan_seeds = ["1.2.3.4:9470"]
[[service]]
name = "a"
port = 1
check = { tcp = "127.0.0.1:1", interval = "1s", timeout = "2s", rise = 0 }
"#,
    );
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(errs[0].starts_with("wan_seeds:"));
    assert!(errs[1].starts_with("service[0].check.timeout:"));
    assert!(errs[2].starts_with("service[0].check.rise:"));
}

#[test]
fn an_upstream_may_pin_a_cluster_but_then_has_no_failover() {
    let base = "cluster = \"c\"\nmesh = \"m\"\n[[upstream]]\nservice = \"db\"\nlisten = \"127.0.0.1:15432\"\n";
    let c = Config::from_toml_str(&format!("{base}cluster = \"west\"\n")).unwrap();
    assert_eq!(c.upstreams[0].cluster.as_deref(), Some("west"));
    let errs = errors(&format!(
        "{base}cluster = \"west\"\nfailover = [\"south\"]\n"
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("upstream[0].failover:"), "{errs:?}");
    let errs = errors(&format!("{base}cluster = \"no/such\"\n"));
    assert!(errs[0].starts_with("upstream[0].cluster:"), "{errs:?}");
}

#[test]
fn ca_section_defaults_and_bounds() {
    let base = "cluster = \"c\"\nmesh = \"m\"\ndata_dir = \"/d\"\n";
    let c = Config::from_toml_str(base).unwrap();
    assert!(c.ca.is_none(), "no [ca]: not a CA node");
    let c = Config::from_toml_str(&format!("{base}[ca]\n")).unwrap();
    let ca = c.ca.unwrap();
    assert_eq!(ca.key, PathBuf::from("/d/ca.key"));
    assert_eq!(ca.cert_ttl, Duration::from_secs(72 * 3600));
    let c = Config::from_toml_str(&format!("{base}[ca]\ncert_ttl = \"6s\"\n")).unwrap();
    assert_eq!(c.ca.unwrap().cert_ttl, Duration::from_secs(6));
    for bad in ["1s", "100d", "soon"] {
        let errs = errors(&format!("{base}[ca]\ncert_ttl = \"{bad}\"\n"));
        assert!(
            errs.iter().any(|e| e.starts_with("ca.cert_ttl")),
            "{bad}: {errs:?}"
        );
    }
    let errs = errors(&format!("{base}[ca]\nkey_file = \"x\"\n"));
    assert!(errs.iter().any(|e| e.contains("ca.key_file")), "{errs:?}");
}

#[test]
fn workers_default_to_one_and_are_bounded() {
    let base = "cluster = \"c\"\nmesh = \"m\"\ndata_dir = \"/d\"\n";
    assert_eq!(Config::from_toml_str(base).unwrap().workers, 1);
    let c = Config::from_toml_str(&format!("workers = 4\n{base}")).unwrap();
    assert_eq!(c.workers, 4);
    for bad in ["0", "-1", "257"] {
        let errs = errors(&format!("workers = {bad}\n{base}"));
        assert!(
            errs.iter().any(|e| e.starts_with("workers:")),
            "{bad}: {errs:?}"
        );
    }
    let errs = errors(&format!("workers = \"two\"\n{base}"));
    assert!(errs.iter().any(|e| e.contains("workers")), "{errs:?}");
}

#[test]
fn exec_and_ttl_checks_are_validated() {
    let svc = |check: &str| {
        format!(
            "node = \"a\"\ncluster = \"east\"\nmesh = \"acme\"\n[[service]]\nname = \"api\"\naddress = \"127.0.0.1\"\nport = 8080\ncheck = {check}\n"
        )
    };
    let ok = Config::from_toml_str(&svc("{ exec = [\"/usr/bin/true\"] }")).expect("exec");
    assert!(matches!(
        ok.services[0].check.as_ref().map(|c| &c.target),
        Some(CheckTarget::Exec(a)) if a == &["/usr/bin/true".to_string()]
    ));
    let ok = Config::from_toml_str(&svc("{ ttl = \"30s\" }")).expect("ttl");
    assert!(matches!(
        ok.services[0].check.as_ref().map(|c| &c.target),
        Some(CheckTarget::Ttl(d)) if *d == Duration::from_secs(30)
    ));
    let e = errors(&svc("{ exec = [\"true\"] }"));
    assert!(
        e[0].contains("service[0].check.exec") && e[0].contains("absolute path"),
        "{e:?}"
    );
    let e = errors(&svc("{ exec = [] }"));
    assert!(e[0].contains("service[0].check.exec"), "{e:?}");
    let e = errors(&svc("{ ttl = \"30s\", tcp = \"127.0.0.1:1\" }"));
    assert!(e[0].contains("not several"), "{e:?}");
    let e = errors(&svc("{ ttl = \"30s\", interval = \"1s\" }"));
    assert!(e[0].contains("a ttl check has no interval"), "{e:?}");
    let e = errors(&svc("{ ttl = \"soon\" }"));
    assert!(e[0].contains("service[0].check.ttl"), "{e:?}");
}

#[test]
fn dns_section_defaults_bounds_and_loopback_only() {
    let base = "cluster = \"c\"\nmesh = \"m\"\n[[upstream]]\nservice = \"db\"\nlisten = \"127.100.0.1:5432\"\n[dns]\n";
    assert_eq!(
        Config::from_toml_str("cluster = \"c\"\nmesh = \"m\"\n")
            .unwrap()
            .dns,
        None
    );
    let c = Config::from_toml_str(&format!("{base}listen = \"127.0.0.1:8600\"\n")).unwrap();
    assert_eq!(
        c.dns,
        Some(DnsSettings {
            listen: "127.0.0.1:8600".parse().unwrap(),
            mode: crate::dns::DnsMode::Upstreams,
            ttl: DEFAULT_DNS_TTL,
            domain: "mesh".into(),
        })
    );
    let c = Config::from_toml_str(&format!(
        "{base}listen = \"127.0.0.1:8600\"\nmode = \"instances\"\nttl = \"30s\"\ndomain = \"mesh.internal\"\n"
    ))
    .unwrap();
    let d = c.dns.unwrap();
    assert_eq!(
        (d.mode, d.ttl, d.domain.as_str()),
        (crate::dns::DnsMode::Instances, 30, "mesh.internal")
    );
    let errs = errors(&format!(
        "{base}listen = \"10.0.0.5:53\"\nmode = \"all\"\nttl = \"2h\"\ndomain = \"Mesh.\"\n"
    ));
    for key in ["dns.listen:", "dns.mode:", "dns.ttl:", "dns.domain:"] {
        assert!(errs.iter().any(|e| e.starts_with(key)), "{key} in {errs:?}");
    }
    assert!(
        errs.iter().any(|e| e.contains("not a loopback address")),
        "{errs:?}"
    );
    let errs = errors(&format!("{base}mode = \"instances\"\n"));
    assert!(errs[0].starts_with("dns.listen: missing"), "{errs:?}");
    let errs = errors(&format!("{base}listen = \"127.100.0.1:5432\"\n"));
    assert!(errs[0].contains("collides with an upstream"), "{errs:?}");
}
