//! `Range` evaluation: never panics, and a partial answer lies in the file.
#![no_main]

use cockatiel::api::range::{evaluate, RangeAnswer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, &str)| {
    let (len, header) = input;
    for len in [len, len % 1024] {
        if let RangeAnswer::Partial { start, end } = evaluate(header, len) {
            assert!(
                start <= end && end < len,
                "{header:?} len {len}: {start}-{end}"
            );
        }
    }
});
