//! Fuzz target: the runtime's `header` input handling (see `aipod_runtime::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aipod_runtime::fuzzing::header(data));
