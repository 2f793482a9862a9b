#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_init::fuzzing::gpt_mbr(data));
