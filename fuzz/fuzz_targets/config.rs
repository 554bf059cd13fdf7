//! A config file is user input: any text parses to a config or to a list of
//! errors naming their keys, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnode_node::config::RawConfig;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match RawConfig::parse(&text) {
        Ok(raw) => {
            if let Err(errors) = raw.validate() {
                assert!(!errors.is_empty(), "an invalid config names its problems");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
