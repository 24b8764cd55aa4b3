#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringvault::fuzzing::envelope(data));
