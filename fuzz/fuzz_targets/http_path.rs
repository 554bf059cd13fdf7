//! A request path comes from any caller: it normalizes to a canonical path
//! that normalizes to itself, or is refused, never a panic. Whatever a
//! server that decodes `%2e` and resolves dot segments would read as a
//! path under `/admin` normalizes to a path under `/admin`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnode_node::uri_path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = normalize(path) {
        assert_eq!(normalize(&n).as_deref(), Ok(n.as_ref()), "{path:?}");
        assert!(n == "*" || n.starts_with('/'));
        assert!(!n.contains("//"), "{path:?} -> {n:?}");
        assert!(
            !n.split('/').any(|s| s == "." || s == ".."),
            "{path:?} -> {n:?}"
        );
    }
});
