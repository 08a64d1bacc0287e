//! Fuzz target: the runtime's `worker_line` input handling (see `aipod_runtime::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aipod_runtime::fuzzing::worker_line(data));
