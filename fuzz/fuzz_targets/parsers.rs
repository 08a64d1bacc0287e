//! Fuzz target: the duration and size syntax of flags and environment
//! variables. Whatever parses formats back to text that parses to the same
//! value.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(d) = aipod::duration::parse(text) {
        let again = aipod::duration::parse(&aipod::duration::format(d)).expect("a formatted duration parses");
        assert_eq!(again, d, "duration round trip of {text:?}");
    }
    if let Ok(n) = aipod::size::parse(text) {
        let again = aipod::size::parse(&n.to_string()).expect("a number of bytes parses");
        assert_eq!(again, n, "size round trip of {text:?}");
    }
});
