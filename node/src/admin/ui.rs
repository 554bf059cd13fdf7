//! The dashboard (`/ui`): three static files compiled into the binary. The
//! page reads the admin API from the same origin and nothing else; its
//! Content-Security-Policy says so to the browser (no inline script, no
//! other origin, not framed).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

const INDEX: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/style.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) fn serve(path: &str) -> Response<Full<Bytes>> {
    let (body, kind) = match path {
        "/ui" => {
            return Response::builder()
                .status(StatusCode::MOVED_PERMANENTLY)
                .header("location", "/ui/")
                .body(Full::new(Bytes::new()))
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
        }
        "/ui/" | "/ui/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/ui/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/ui/style.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return super::error(StatusCode::NOT_FOUND, "no such file in the dashboard"),
    };
    Response::builder()
        .header("content-type", kind)
        .header("content-security-policy", CSP)
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .header("cache-control", "no-cache")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_are_served_with_their_types_and_the_policy() {
        for (path, kind) in [
            ("/ui/", "text/html"),
            ("/ui/app.js", "text/javascript"),
            ("/ui/style.css", "text/css"),
        ] {
            let r = serve(path);
            assert_eq!(r.status(), StatusCode::OK);
            let ct = r.headers()["content-type"].to_str().unwrap();
            assert!(ct.starts_with(kind), "{path}: {ct}");
            assert!(r.headers().contains_key("content-security-policy"));
        }
        assert_eq!(serve("/ui").status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(serve("/ui/../admin.secret").status(), StatusCode::NOT_FOUND);
    }

    /// Names come from the network: the script must never parse them as HTML.
    #[test]
    fn the_script_builds_no_html_from_strings() {
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ] {
            assert!(!APP_JS.contains(banned), "app.js uses {banned}");
        }
        // Everything it loads is its own: no other origin in any file.
        for file in [INDEX, APP_JS, STYLE] {
            for scheme in ["https://", "//cdn", "http://"] {
                let hits: Vec<&str> = file
                    .lines()
                    .filter(|l| l.contains(scheme) && !l.contains("www.w3.org/2000/svg"))
                    .collect();
                assert!(hits.is_empty(), "{scheme}: {hits:?}");
            }
        }
    }
}
