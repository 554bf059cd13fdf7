//! One canonical form for a request's path, decided before any rule sees
//! it (sans-IO, no allocation when the path is already canonical).
//!
//! Intentions (`path_prefix = "/admin"`) and routes compare the request's
//! path as text, while the application behind them usually normalizes it
//! before it looks the path up. Without one canonical form, a caller that
//! may reach a service at all could step around a deny with `//admin`,
//! `/%61dmin` or `/x/../admin`. So a path is normalized once at the caller
//! (before routing) and again at the destination (before authorization;
//! the destination does not trust the caller), and the request goes on
//! with the normalized path, so what was decided is what is served. As
//! Envoy's `normalize_path` plus `merge_slashes`:
//!
//! - percent-escapes of unreserved characters (RFC 3986: letters, digits,
//!   `-._~`) are decoded, every other escape is kept with upper-case hex;
//! - runs of `/` become one;
//! - `.` and `..` segments are removed (RFC 3986 §5.2.4; `..` stops at the
//!   root).
//!
//! And refused, since no canonical form is safe for them: an invalid
//! escape, an escaped `/` or `\` (`%2F`, `%5C`: one hop reads a separator
//! where another reads a character), a raw `\` (a separator to some
//! servers), and a dot segment with parameters (`..;x`, which Tomcat-style
//! servers read as `..`). The query is not part of the path and is left
//! alone.

use std::borrow::Cow;
use std::fmt;

/// Why a path has no canonical form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadPath {
    /// Not `*` and not starting with `/`.
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// `%2F` or `%5C`.
    EscapedSeparator,
    /// A raw `\`.
    Backslash,
    /// `.;x` or `..;x`.
    DotSegmentWithParameters,
}

impl BadPath {
    /// A short reason, for the `x-meshnode-error` detail and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BadPath::NotAbsolute => "the path does not start with /",
            BadPath::BadEscape => "a % is not followed by two hex digits",
            BadPath::EscapedSeparator => "an escaped / or \\ (%2F, %5C)",
            BadPath::Backslash => "a \\ in the path",
            BadPath::DotSegmentWithParameters => "a . or .. segment with ; parameters",
        }
    }
}

impl fmt::Display for BadPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether `path` is already canonical (the common case, checked without
/// allocating): no `%` that could change, no `\`, no empty or dot segment.
fn canonical(path: &[u8]) -> bool {
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            b'\\' => return false,
            b'%' => {
                let (Some(h), Some(l)) = (
                    path.get(i + 1).copied().and_then(hex),
                    path.get(i + 2).copied().and_then(hex),
                ) else {
                    return false;
                };
                let v = h * 16 + l;
                // Lower-case hex, an unreserved character or a separator
                // changes or is refused.
                if unreserved(v)
                    || v == b'/'
                    || v == b'\\'
                    || path[i + 1].is_ascii_lowercase()
                    || path[i + 2].is_ascii_lowercase()
                {
                    return false;
                }
                i += 3;
                continue;
            }
            b'/' => {
                let rest = &path[i + 1..];
                let seg_end = rest.iter().position(|c| *c == b'/').unwrap_or(rest.len());
                let seg = &rest[..seg_end];
                // An empty segment is `//` (a trailing `/` is fine).
                if (seg.is_empty() && seg_end < rest.len()) || is_dot(seg) || dot_params(seg) {
                    return false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    true
}

fn is_dot(seg: &[u8]) -> bool {
    seg == b"." || seg == b".."
}

fn dot_params(seg: &[u8]) -> bool {
    seg.starts_with(b".;") || seg.starts_with(b"..;")
}

/// The canonical form of `path` (the path of a request target, without
/// its query), or why it has none. `*` (`OPTIONS *`) is kept as it is.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, BadPath> {
    let b = path.as_bytes();
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if b.first() != Some(&b'/') {
        return Err(BadPath::NotAbsolute);
    }
    if canonical(b) {
        return Ok(Cow::Borrowed(path));
    }
    // Decode unreserved escapes, upper-case the others.
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => return Err(BadPath::Backslash),
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(BadPath::BadEscape);
                };
                let v = h * 16 + l;
                if v == b'/' || v == b'\\' {
                    return Err(BadPath::EscapedSeparator);
                }
                if unreserved(v) {
                    decoded.push(v);
                } else {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    decoded.extend_from_slice(&[b'%', HEX[h as usize], HEX[l as usize]]);
                }
                i += 3;
            }
            c => {
                decoded.push(c);
                i += 1;
            }
        }
    }
    // Segments: empty ones merged, dot segments removed.
    let mut out: Vec<u8> = Vec::with_capacity(decoded.len());
    let mut trailing = false;
    for seg in decoded[1..].split(|c| *c == b'/') {
        trailing = false;
        match seg {
            b"" => trailing = true,
            b"." => trailing = true,
            b".." => {
                let cut = out.iter().rposition(|c| *c == b'/').unwrap_or(0);
                out.truncate(cut);
                trailing = true;
            }
            s if dot_params(s) => return Err(BadPath::DotSegmentWithParameters),
            s => {
                out.push(b'/');
                out.extend_from_slice(s);
            }
        }
    }
    if trailing || out.is_empty() {
        out.push(b'/');
    }
    // Only ASCII bytes were added and whole UTF-8 sequences kept (they are
    // never `/` or `%`), so this holds; the error arm is unreachable.
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| BadPath::BadEscape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_known_ways_around_a_prefix_all_become_the_prefix() {
        for (input, want) in [
            ("/admin", "/admin"),
            ("//admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%2e%2E/admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/./admin/", "/admin/"),
            ("/x/y/../../admin//users", "/admin/users"),
            ("/../../admin", "/admin"),
            ("/admin/.", "/admin/"),
            ("/admin/..", "/"),
            ("/", "/"),
            ("//", "/"),
            ("/a%3ab", "/a%3Ab"),
            ("/a%3Ab", "/a%3Ab"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/café", "/café"),
            ("/a;b/c", "/a;b/c"),
            ("/..a/.b/", "/..a/.b/"),
            ("*", "*"),
        ] {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn paths_without_a_safe_canonical_form_are_refused() {
        for (input, why) in [
            ("/admin%2Fusers", BadPath::EscapedSeparator),
            ("/admin%2fusers", BadPath::EscapedSeparator),
            ("/a%5Cb", BadPath::EscapedSeparator),
            ("/a\\b", BadPath::Backslash),
            ("/a%", BadPath::BadEscape),
            ("/a%4", BadPath::BadEscape),
            ("/a%zz", BadPath::BadEscape),
            ("/x/..;/admin", BadPath::DotSegmentWithParameters),
            ("/.;x/admin", BadPath::DotSegmentWithParameters),
            ("admin", BadPath::NotAbsolute),
            ("", BadPath::NotAbsolute),
        ] {
            assert_eq!(normalize(input), Err(why), "{input}");
        }
    }

    #[test]
    fn a_canonical_path_is_borrowed() {
        for p in ["/", "/orders/17", "/a/b/", "/%3A", "/..x", "*"] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(_))),
                "{p} allocated"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Any path normalizes to a canonical one (no empty or dot
        /// segment, no escape of an unreserved character), or is refused;
        /// normalizing again changes nothing.
        #[test]
        fn normal_forms_are_canonical_and_stable(
            s in "/[a-zA-Z0-9%./;_~\\\\-]{0,40}"
        ) {
            if let Ok(n) = normalize(&s) {
                prop_assert!(canonical(n.as_bytes()), "{s} -> {n}");
                prop_assert!(n.starts_with('/'));
                let again = normalize(&n);
                prop_assert_eq!(again.as_deref(), Ok(n.as_ref()));
            }
        }

        /// A path that reads as `/admin...` to a server that decodes and
        /// resolves it normalizes to a path starting with `/admin`, so a
        /// prefix rule sees what the server will serve.
        #[test]
        fn what_a_server_would_serve_is_what_the_rules_see(
            junk in proptest::collection::vec(
                prop_oneof![Just("/"), Just("./"), Just("x/../"), Just("%2e/"), Just("a/%2E%2e/")],
                0..5,
            ),
            a in prop_oneof![Just("a"), Just("%61"), Just("%41")],
        ) {
            let s = format!("/{}{a}dmin/x", junk.concat());
            let n = normalize(&s).map_err(|e| TestCaseError::fail(format!("{s}: {e}")))?;
            let lower = n.to_ascii_lowercase();
            prop_assert!(lower.starts_with("/admin/"), "{} -> {}", s, n);
        }
    }
}
