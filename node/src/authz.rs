//! Authorization: may this caller reach this service? Decided at the
//! destination node, before it connects to the application.
//!
//! The inputs are the held policy documents (`intentions`, one per
//! destination service, and the mesh `defaults`), the caller (its node
//! identity and the service it acts as, both proven by certificate, or
//! carried by a gateway), and whether this node has loaded the mesh's policy
//! since it started. [`Snapshot::decide`] is pure; [`Authorizer`] keeps the
//! snapshot current as documents are adopted.
//!
//! Rules are tried in order and the first whose source matches decides;
//! without a match, the mesh default decides (`allow` without a `defaults`
//! document, so meshes without policy keep working). Until policy is loaded,
//! a node that does not hold an explicit `default_intention = "allow"` fails
//! closed: it cannot tell whether the mesh is default deny, or whether the
//! intentions it holds are current.

use std::collections::HashMap;
use std::sync::Arc;

use meshnode_transport::Identity;
use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::AUTHZ_DECISIONS;
#[cfg(test)]
use crate::policy::schema::Pattern;
use crate::policy::schema::{Action, Body, Document, Rule, Source};
use crate::policy::PolicyStore;

/// Who is calling.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    pub identity: &'a Identity,
    /// The service the caller acts as; `None`: the node alone.
    pub service: Option<&'a str>,
}

/// What is being authorized: rules with HTTP conditions (L7) need the
/// request to match.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    /// A TCP stream: no request to see. A rule with HTTP conditions that
    /// allows does not match, one that denies does (fail closed).
    Stream,
    /// An HTTP stream being opened, before its requests: a conditional
    /// allow matches and a conditional deny does not, because each request
    /// is then decided on its own ([`Snapshot::has_conditions`]).
    HttpStream,
    /// One HTTP request.
    Http { method: &'a str, path: &'a str },
}

/// Why a decision was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Reason {
    /// Rule `index` (from 0) of the service's intentions (its source: [`Snapshot::rule_source`]).
    Rule { index: usize },
    /// No rule matched (or the service has no intentions): the mesh default.
    /// `explicit`: a `defaults` document says so (else the built-in allow).
    Default { explicit: bool },
    /// Policy not loaded since start, and no explicit allow default held.
    PolicyPending,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub action: Action,
    #[serde(flatten)]
    pub reason: Reason,
}

/// The documents authorization reads, taken from the store at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    intentions: HashMap<String, Vec<Rule>>,
    /// The `defaults` document's `default_intention`, if one is held.
    default: Option<Action>,
}

// === impl Decision ===

impl Decision {
    /// `(decision, reason)` label values of [`AUTHZ_DECISIONS`].
    pub fn labels(&self) -> (&'static str, &'static str) {
        let verdict = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        let reason = match self.reason {
            Reason::Rule { .. } => "rule",
            Reason::Default { .. } => "default",
            Reason::PolicyPending => "policy_pending",
        };
        (verdict, reason)
    }
}

/// The counters of one service label, by `(decision, reason)`: looked up
/// once, so a decision costs a read lock and a hash of the label, not a
/// registry lookup with three fresh labels.
type Counters = HashMap<(&'static str, &'static str), metrics::Counter>;
static COUNTERS: std::sync::LazyLock<std::sync::RwLock<HashMap<String, Counters>>> =
    std::sync::LazyLock::new(Default::default);

/// Counts a decision for `service_label` (a bounded label value: the cache
/// is as bounded as the label).
pub fn count(service_label: &str, decision: &Decision) {
    count_labels(service_label, decision.labels());
}

/// A caller claiming a service its certificate does not name: a denial
/// made before any rule is read.
pub fn count_identity_denial(service_label: &str) {
    count_labels(service_label, ("deny", "identity"));
}

fn count_labels(service_label: &str, labels: (&'static str, &'static str)) {
    if let Ok(cache) = COUNTERS.read() {
        if let Some(c) = cache.get(service_label).and_then(|m| m.get(&labels)) {
            c.increment(1);
            return;
        }
    }
    let (verdict, reason) = labels;
    let counter = metrics::counter!(AUTHZ_DECISIONS, "service" => service_label.to_string(),
        "decision" => verdict, "reason" => reason);
    counter.increment(1);
    if let Ok(mut cache) = COUNTERS.write() {
        cache
            .entry(service_label.to_string())
            .or_default()
            .insert(labels, counter);
    }
}

// === impl Snapshot ===

impl Snapshot {
    /// A snapshot of these (validated) documents; other kinds are ignored.
    pub fn from_documents(docs: impl IntoIterator<Item = Document>) -> Self {
        let mut s = Snapshot::default();
        for d in docs {
            match d.body {
                Body::Intentions { rule } => {
                    s.intentions.insert(d.name, rule);
                }
                Body::Defaults { default_intention } => s.default = Some(default_intention),
                _ => {}
            }
        }
        s
    }

    pub fn from_store(store: &PolicyStore) -> Self {
        Self::from_documents(store.all().into_iter().filter_map(|h| h.parsed))
    }

    /// The source of rule `index` of `service`'s intentions, as written.
    pub fn rule_source(&self, service: &str, index: usize) -> Option<String> {
        let rule = self.intentions.get(service)?.get(index)?;
        Some(String::from(rule.source.clone()))
    }

    /// The held mesh default, if any.
    pub fn default_intention(&self) -> Option<Action> {
        self.default
    }

    /// Whether the mesh default is deny (held explicitly).
    pub fn default_deny(&self) -> bool {
        self.default == Some(Action::Deny)
    }

    /// Whether `service`'s intentions have a rule with HTTP conditions, so
    /// each request of an HTTP stream is decided on its own.
    pub fn has_conditions(&self, service: &str) -> bool {
        self.intentions
            .get(service)
            .is_some_and(|rules| rules.iter().any(|r| !r.http.is_empty()))
    }

    /// May `caller` open a TCP stream to `service` here? `loaded`: this
    /// node has loaded the mesh's policy since it started.
    pub fn decide(&self, service: &str, caller: Caller<'_>, loaded: bool) -> Decision {
        self.decide_for(service, caller, loaded, Request::Stream)
    }

    /// [`Snapshot::decide`] for what `request` says is asked.
    pub fn decide_for(
        &self,
        service: &str,
        caller: Caller<'_>,
        loaded: bool,
        request: Request<'_>,
    ) -> Decision {
        if !loaded && self.default != Some(Action::Allow) {
            return Decision {
                action: Action::Deny,
                reason: Reason::PolicyPending,
            };
        }
        if let Some(rules) = self.intentions.get(service) {
            if let Some((index, rule)) = rules
                .iter()
                .enumerate()
                .find(|(_, r)| matches(&r.source, caller) && applies(r, request))
            {
                return Decision {
                    action: rule.action,
                    reason: Reason::Rule { index },
                };
            }
        }
        Decision {
            action: self.default.unwrap_or(Action::Allow),
            reason: Reason::Default {
                explicit: self.default.is_some(),
            },
        }
    }
}

/// Do `rule`'s HTTP conditions (if any) hold for `request`?
fn applies(rule: &Rule, request: Request<'_>) -> bool {
    if rule.http.is_empty() {
        return true;
    }
    match request {
        Request::Stream => rule.action == Action::Deny,
        Request::HttpStream => rule.action == Action::Allow,
        Request::Http { method, path } => rule.http.holds(method, path),
    }
}

/// Does `source` name `caller`?
pub fn matches(source: &Source, caller: Caller<'_>) -> bool {
    match source {
        Source::Any => true,
        Source::Service(s) => caller.service == Some(s.as_str()),
        Source::Cluster(c) => caller.identity.cluster() == c,
        Source::Spiffe {
            mesh,
            cluster,
            node,
        } => {
            caller.identity.mesh() == mesh
                && cluster.matches(caller.identity.cluster())
                && node.matches(caller.identity.node())
        }
    }
}

/// The current [`Snapshot`], rebuilt whenever the store adopts a document.
#[derive(Clone)]
pub struct Authorizer {
    current: watch::Receiver<Arc<Snapshot>>,
}

impl Authorizer {
    /// Builds the first snapshot now (documents loaded from the data dir are
    /// in force before the first stream) and follows the store after that.
    pub fn follow(store: Arc<PolicyStore>) -> Self {
        Self {
            current: crate::policy::follow(store, Snapshot::from_store),
        }
    }

    /// An authorizer that always reads `snapshot` (benchmarks, tests).
    pub fn fixed(snapshot: Snapshot) -> Self {
        let (_tx, rx) = watch::channel(Arc::new(snapshot));
        Self { current: rx }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::schema;

    fn id(cluster: &str, node: &str) -> Identity {
        Identity::new("acme", cluster, node).unwrap()
    }

    fn snap(docs: &[&str]) -> Snapshot {
        Snapshot::from_documents(docs.iter().map(|t| schema::parse(t).unwrap()))
    }

    const API: &str = r#"
kind = "intentions"
name = "api"
[[rule]]
source = "service:batch"
action = "deny"
[[rule]]
source = "service:web"
action = "allow"
[[rule]]
source = "cluster:west"
action = "allow"
[[rule]]
source = "spiffe://acme/cluster/east/node/ops-*"
action = "deny"
"#;

    const L7: &str = r#"
kind = "intentions"
name = "api"
[[rule]]
source = "service:web"
action = "deny"
path_prefix = "/admin"
[[rule]]
source = "service:web"
action = "allow"
methods = ["GET", "HEAD"]
[[rule]]
source = "*"
action = "deny"
"#;

    #[test]
    fn http_conditions_decide_per_request_and_fail_closed_without_one() {
        let s = snap(&[L7]);
        assert!(s.has_conditions("api") && !s.has_conditions("db"));
        let east = id("east", "vm-1");
        let web = Caller {
            identity: &east,
            service: Some("web"),
        };
        let http = |method, path| Request::Http { method, path };
        let d = |r| s.decide_for("api", web, true, r);
        assert_eq!(d(http("GET", "/orders")).reason, Reason::Rule { index: 1 });
        assert_eq!(d(http("GET", "/orders")).action, Action::Allow);
        assert_eq!(d(http("POST", "/orders")).action, Action::Deny);
        assert_eq!(
            d(http("GET", "/admin/users")).reason,
            Reason::Rule { index: 0 }
        );
        assert_eq!(d(http("GET", "/admin/users")).action, Action::Deny);
        // An HTTP stream opens (its requests are decided one by one)...
        assert_eq!(d(Request::HttpStream).action, Action::Allow);
        // ...a TCP stream cannot meet the conditions: the deny applies.
        assert_eq!(d(Request::Stream).action, Action::Deny);
        assert_eq!(d(Request::Stream).reason, Reason::Rule { index: 0 });
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let s = snap(&[
            API,
            "kind = \"defaults\"\nname = \"mesh\"\ndefault_intention = \"deny\"",
        ]);
        let east = id("east", "vm-1");
        let web = Caller {
            identity: &east,
            service: Some("web"),
        };
        let d = s.decide("api", web, true);
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.reason, Reason::Rule { index: 1 });
        assert_eq!(s.rule_source("api", 1).as_deref(), Some("service:web"));
        // Order matters: batch is denied before any later rule is looked at.
        let west = id("west", "vm-9");
        let batch = Caller {
            identity: &west,
            service: Some("batch"),
        };
        assert_eq!(s.decide("api", batch, true).action, Action::Deny);
        // By cluster.
        let anyone_west = Caller {
            identity: &west,
            service: None,
        };
        assert_eq!(s.decide("api", anyone_west, true).action, Action::Allow);
        // No rule matches: the mesh default (deny here).
        let plain = Caller {
            identity: &east,
            service: None,
        };
        let d = s.decide("api", plain, true);
        assert_eq!(d.action, Action::Deny);
        assert_eq!(d.reason, Reason::Default { explicit: true });
        // A service with no intentions document: the default too.
        assert_eq!(s.decide("db", web, true).action, Action::Deny);
    }

    #[test]
    fn identity_patterns_match_a_cluster_and_any_or_one_node() {
        let spiffe = |mesh: &str, cluster, node| Source::Spiffe {
            mesh: mesh.into(),
            cluster,
            node,
        };
        let any = spiffe("acme", Pattern::exact("east"), Pattern::any());
        let one = spiffe("acme", Pattern::exact("east"), Pattern::exact("vm-1"));
        let other_mesh = spiffe("evil", Pattern::any(), Pattern::any());
        let ops = spiffe(
            "acme",
            Pattern::any(),
            Pattern {
                prefix: "ops-".into(),
                wildcard: true,
            },
        );
        let (a, b, w) = (id("east", "vm-1"), id("east", "vm-2"), id("west", "vm-1"));
        let o = id("west", "ops-3");
        let c = |i| Caller {
            identity: i,
            service: None,
        };
        assert!(matches(&any, c(&a)) && matches(&any, c(&b)) && !matches(&any, c(&w)));
        assert!(matches(&one, c(&a)) && !matches(&one, c(&b)) && !matches(&one, c(&w)));
        assert!(!matches(&other_mesh, c(&a)));
        assert!(matches(&ops, c(&o)) && !matches(&ops, c(&a)));
        // A service rule never matches a caller acting as no service.
        assert!(!matches(&Source::Service("web".into()), c(&a)));
    }

    #[test]
    fn without_policy_everything_is_allowed_once_loaded() {
        let s = Snapshot::default();
        let me = id("east", "a");
        let c = Caller {
            identity: &me,
            service: None,
        };
        let d = s.decide("api", c, true);
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.reason, Reason::Default { explicit: false });
    }

    #[test]
    fn before_policy_is_loaded_only_an_explicit_allow_default_decides() {
        let me = id("east", "a");
        let web = Caller {
            identity: &me,
            service: Some("web"),
        };
        let allow_all = "kind = \"defaults\"\nname = \"mesh\"\ndefault_intention = \"allow\"";
        let deny_all = "kind = \"defaults\"\nname = \"mesh\"\ndefault_intention = \"deny\"";
        for (docs, action) in [
            (vec![], Action::Deny),
            (vec![API, deny_all], Action::Deny),
            (vec![API, allow_all], Action::Allow),
        ] {
            let d = snap(&docs).decide("api", web, false);
            assert_eq!(d.action, action, "{docs:?}");
        }
        // Pending, even though the held intentions would allow: they may be stale.
        let d = snap(&[API, deny_all]).decide("api", web, false);
        assert_eq!(d.reason, Reason::PolicyPending);
        assert_eq!(
            snap(&[API, deny_all]).decide("api", web, true).action,
            Action::Allow
        );
    }
}
