//! Fuzz target: the runtime's `zstd_payload` input handling (see `aipod_runtime::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aipod_runtime::fuzzing::zstd_payload(data));
