//! Who may do what on the admin API: a sans-IO decision over the method, the
//! path and the headers.
//!
//! - Reads (`GET`, `HEAD`) are open on a loopback admin address, if their
//!   `Host` (when they send one) names the admin address: a page whose
//!   name was rebound to 127.0.0.1 (DNS rebinding) could otherwise read the
//!   catalog from a local browser. With `admin_allow_remote = true` only
//!   `/v1/health`, `/metrics` and the dashboard's static files (`/ui`)
//!   stay open; everything else needs the secret.
//! - Every other method changes state (`leave`, tokens, revocations) and needs
//!   the admin secret (`Authorization: Bearer`, compared in constant time),
//!   except `POST /v1/policy` on a loopback address: a signed policy
//!   document authorises itself.
//!   It also needs a `Host` that names the admin address and no foreign
//!   `Origin`: a web page in a local browser can send a cross-origin `POST`
//!   without a preflight, but not with our `Host` rebound to its name, and
//!   a browser always says where the request came from.

use std::net::SocketAddr;

use hyper::header::{HeaderMap, AUTHORIZATION, HOST, ORIGIN};
use hyper::{Method, StatusCode};

use super::SECRET_FILE;

/// Endpoints that stay open without the secret even on a remote admin address.
const ALWAYS_OPEN: [&str; 2] = ["/v1/health", "/metrics"];
/// The dashboard's static files: no data in them (it reads the API, which
/// asks for the secret on a remote admin address).
pub const UI: &str = "/ui";
/// Writes whose body authorises itself: a policy document signed by an
/// operator. On a loopback admin address they need no secret (the Host and
/// Origin checks still apply); the agent verifies the signature.
const SELF_AUTHENTICATING: [&str; 1] = ["/v1/policy"];
/// `POST /v1/check/<service>`: authorized by the service's check token.
pub const CHECK_REPORTS: &str = "/v1/check/";

pub struct Access {
    /// The admin API's own address (the bound one).
    pub addr: SocketAddr,
    /// `admin_allow_remote`: reads need the secret too.
    pub remote: bool,
    pub secret: String,
}

/// Why a request is refused: a status and a message for the caller.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: String,
}

impl Access {
    pub fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Refused> {
        let read = method == Method::GET || method == Method::HEAD;
        let ui = path == UI || path.starts_with("/ui/");
        // A Host that is not text names nothing.
        let host = headers.get(HOST).map(|v| v.to_str().unwrap_or(""));
        if read && !self.remote {
            return match host {
                Some(h) if !self.names_me(h) => Err(self.wrong_host(h)),
                _ => Ok(()),
            };
        }
        if read && (ALWAYS_OPEN.contains(&path) || ui) {
            return Ok(());
        }
        if !read {
            if !host.is_some_and(|h| self.names_me(h)) {
                return Err(self.wrong_host(host.unwrap_or("")));
            }
            if let Some(origin) = headers.get(ORIGIN) {
                let ok = origin
                    .to_str()
                    .ok()
                    .and_then(|o| o.strip_prefix("http://"))
                    .is_some_and(|h| self.names_me(h));
                if !ok {
                    return Err(Refused {
                        status: StatusCode::FORBIDDEN,
                        reason: "origin",
                        message: "requests from web pages are refused".into(),
                    });
                }
            }
        }
        if !read && !self.remote && SELF_AUTHENTICATING.contains(&path) {
            return Ok(());
        }
        // A ttl check's report carries its service's own token, which the
        // handler checks: the application never holds the admin secret.
        if method == Method::POST && !self.remote && path.starts_with(CHECK_REPORTS) {
            return Ok(());
        }
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if meshnode_transport::pki::secret_eq(presented.as_bytes(), self.secret.as_bytes()) {
            return Ok(());
        }
        Err(Refused {
            status: StatusCode::UNAUTHORIZED,
            reason: "secret",
            message: format!(
                "this needs the admin secret in <data_dir>/{SECRET_FILE}: run the command as the node's user or root, with --data-dir (or set MESHNODE_ADMIN_SECRET)"
            ),
        })
    }

    fn wrong_host(&self, host: &str) -> Refused {
        Refused {
            status: StatusCode::FORBIDDEN,
            reason: "host",
            message: format!(
                "the Host header must name the admin address {} (got {host:?})",
                self.addr
            ),
        }
    }

    /// A `host[:port]` that names the admin address: its IP, or `localhost`
    /// for a loopback address, with its port.
    fn names_me(&self, host: &str) -> bool {
        let Some((name, port)) = host.rsplit_once(':') else {
            return false;
        };
        if port.parse::<u16>() != Ok(self.addr.port()) {
            return false;
        }
        let name = name.trim_start_matches('[').trim_end_matches(']');
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) => ip == self.addr.ip() || (ip.is_loopback() && self.addr.ip().is_loopback()),
            Err(_) => name.eq_ignore_ascii_case("localhost") && self.addr.ip().is_loopback(),
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    fn access(remote: bool) -> Access {
        Access {
            addr: "127.0.0.1:9471".parse().unwrap(),
            remote,
            secret: "s3cret".into(),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn reason(r: Result<(), Refused>) -> Option<&'static str> {
        r.err().map(|r| r.reason)
    }

    #[test]
    fn a_read_whose_host_is_another_name_is_refused_on_loopback_dns_rebinding() {
        for host in ["127.0.0.1:9471", "localhost:9471", "127.5.5.5:9471"] {
            let h = headers(&[("host", host)]);
            assert_eq!(
                access(false).check(&Method::GET, "/v1/services", &h),
                Ok(()),
                "{host}"
            );
        }
        let mut bad: Vec<HeaderMap> = ["evil.example:9471", "evil.example", "127.0.0.1:80"]
            .iter()
            .map(|h| headers(&[("host", h)]))
            .collect();
        let mut binary = HeaderMap::new();
        binary.insert(HOST, HeaderValue::from_bytes(&[0xff, b':', b'1']).unwrap());
        bad.push(binary);
        for h in &bad {
            for path in ["/v1/services", "/ui/"] {
                assert_eq!(
                    reason(access(false).check(&Method::GET, path, h)),
                    Some("host"),
                    "{h:?} {path}"
                );
            }
        }
        // The dashboard's files need no secret on a remote admin address.
        let remote = access(true);
        let none = HeaderMap::new();
        assert_eq!(remote.check(&Method::GET, "/ui", &none), Ok(()));
        assert_eq!(remote.check(&Method::GET, "/ui/app.js", &none), Ok(()));
        assert_eq!(
            reason(remote.check(&Method::GET, "/uix", &none)),
            Some("secret")
        );
    }

    #[test]
    fn reads_are_open_on_loopback_and_closed_remotely_but_health_and_metrics() {
        let none = HeaderMap::new();
        for path in ["/v1/members", "/v1/status", "/v1/health", "/metrics"] {
            assert_eq!(access(false).check(&Method::GET, path, &none), Ok(()));
        }
        let remote = access(true);
        assert_eq!(remote.check(&Method::GET, "/v1/health", &none), Ok(()));
        assert_eq!(remote.check(&Method::GET, "/metrics", &none), Ok(()));
        assert_eq!(
            reason(remote.check(&Method::GET, "/v1/members", &none)),
            Some("secret")
        );
        let auth = headers(&[("authorization", "Bearer s3cret")]);
        assert_eq!(remote.check(&Method::GET, "/v1/members", &auth), Ok(()));
    }

    #[test]
    fn a_signed_policy_needs_no_secret_on_loopback_but_our_host_and_no_foreign_origin() {
        let host = headers(&[("host", "127.0.0.1:9471")]);
        assert_eq!(
            access(false).check(&Method::POST, "/v1/policy", &host),
            Ok(())
        );
        let page = headers(&[
            ("host", "127.0.0.1:9471"),
            ("origin", "http://evil.example"),
        ]);
        assert_eq!(
            reason(access(false).check(&Method::POST, "/v1/policy", &page)),
            Some("origin")
        );
        let rebound = headers(&[("host", "evil.example:9471")]);
        assert_eq!(
            reason(access(false).check(&Method::POST, "/v1/policy", &rebound)),
            Some("host")
        );
        assert_eq!(
            reason(access(true).check(&Method::POST, "/v1/policy", &host)),
            Some("secret")
        );
        assert_eq!(
            reason(access(false).check(&Method::POST, "/v1/policy/x", &host)),
            Some("secret")
        );
        assert_eq!(
            access(false).check(&Method::POST, "/v1/check/api", &host),
            Ok(())
        );
        assert_eq!(
            reason(access(false).check(&Method::POST, "/v1/check/api", &page)),
            Some("origin")
        );
        assert_eq!(
            reason(access(true).check(&Method::POST, "/v1/check/api", &host)),
            Some("secret")
        );
    }

    #[test]
    fn writes_need_the_secret_our_host_and_no_foreign_origin() {
        let a = access(false);
        let ok = [
            ("host", "127.0.0.1:9471"),
            ("authorization", "Bearer s3cret"),
        ];
        assert_eq!(a.check(&Method::POST, "/v1/leave", &headers(&ok)), Ok(()));
        for host in [
            "localhost:9471",
            "LOCALHOST:9471",
            "127.0.0.2:9471",
            "[::1]:9471",
        ] {
            let h = headers(&[("host", host), ("authorization", "Bearer s3cret")]);
            assert_eq!(a.check(&Method::POST, "/v1/leave", &h), Ok(()), "{host}");
        }
        // What a web page can send: no secret, its own Host (DNS rebinding), its Origin.
        assert_eq!(
            reason(a.check(
                &Method::POST,
                "/v1/leave",
                &headers(&[("host", "127.0.0.1:9471")])
            )),
            Some("secret")
        );
        for host in [
            "evil.example:9471",
            "127.0.0.1:80",
            "127.0.0.1",
            "",
            "localhost:9472",
        ] {
            let h = headers(&[("host", host), ("authorization", "Bearer s3cret")]);
            assert_eq!(
                reason(a.check(&Method::POST, "/v1/leave", &h)),
                Some("host"),
                "{host:?}"
            );
        }
        assert_eq!(
            reason(a.check(
                &Method::POST,
                "/v1/leave",
                &headers(&[("authorization", "Bearer s3cret")])
            )),
            Some("host"),
            "no Host"
        );
        for origin in [
            "http://evil",
            "null",
            "https://127.0.0.1:9471",
            "http://127.0.0.1:1",
        ] {
            let h = headers(&[
                ("host", "127.0.0.1:9471"),
                ("origin", origin),
                ("authorization", "Bearer s3cret"),
            ]);
            assert_eq!(
                reason(a.check(&Method::POST, "/v1/leave", &h)),
                Some("origin"),
                "{origin}"
            );
        }
        let same = headers(&[
            ("host", "127.0.0.1:9471"),
            ("origin", "http://127.0.0.1:9471"),
            ("authorization", "Bearer s3cret"),
        ]);
        assert_eq!(a.check(&Method::POST, "/v1/leave", &same), Ok(()));
        // Wrong, empty, prefixed or unprefixed secrets.
        for auth in [
            "Bearer s3cre",
            "Bearer s3cret ",
            "s3cret",
            "Bearer ",
            "Basic s3cret",
        ] {
            let h = headers(&[("host", "127.0.0.1:9471"), ("authorization", auth)]);
            assert_eq!(
                reason(a.check(&Method::DELETE, "/v1/x", &h)),
                Some("secret"),
                "{auth}"
            );
        }
    }

    #[test]
    fn a_remote_address_is_named_by_its_ip_only() {
        let a = Access {
            addr: "10.0.0.5:9471".parse().unwrap(),
            remote: true,
            secret: "s".into(),
        };
        let h = |host| headers(&[("host", host), ("authorization", "Bearer s")]);
        assert_eq!(
            a.check(&Method::POST, "/v1/leave", &h("10.0.0.5:9471")),
            Ok(())
        );
        for host in ["localhost:9471", "127.0.0.1:9471"] {
            assert_eq!(
                reason(a.check(&Method::POST, "/v1/leave", &h(host))),
                Some("host")
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic_and_never_pass_a_write_without_the_secret(
            host in ".{0,40}", origin in ".{0,40}", auth in ".{0,40}"
        ) {
            let mut h = HeaderMap::new();
            for (k, v) in [("host", &host), ("origin", &origin), ("authorization", &auth)] {
                if let Ok(v) = HeaderValue::from_str(v) {
                    h.insert(k, v);
                }
            }
            let r = access(false).check(&Method::POST, "/v1/leave", &h);
            if r.is_ok() {
                prop_assert_eq!(auth.as_str(), "Bearer s3cret");
            }
        }
    }
}
