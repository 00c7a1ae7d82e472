//! `Range` evaluation: never panics, and every part of an answer lies in
//! the file, without overlap.
#![no_main]

use cockatiel::api::range::{evaluate, RangeAnswer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, &str)| {
    let (len, header) = input;
    for len in [len, len % 1024] {
        let parts = match evaluate(header, len) {
            RangeAnswer::Partial { start, end } => vec![(start, end)],
            RangeAnswer::Several(parts) => parts,
            RangeAnswer::Full | RangeAnswer::Unsatisfiable => continue,
        };
        for &(start, end) in &parts {
            assert!(start <= end && end < len, "{header:?} len {len}: {parts:?}");
        }
        let mut parts = parts;
        parts.sort_unstable();
        for w in parts.windows(2) {
            assert!(w[0].1 < w[1].0, "{header:?} len {len}: {parts:?}");
        }
    }
});
