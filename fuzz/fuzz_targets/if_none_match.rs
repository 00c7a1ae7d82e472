//! `If-None-Match` matching: never panics; `*` and our own tag always match.
#![no_main]

use cockatiel::api::precondition::none_match;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (header, opaque) = input;
    let etag = format!("\"{}\"", opaque.replace('"', ""));
    let _ = none_match(header, &etag);
    assert!(none_match("*", &etag));
    assert!(none_match(&etag, &etag));
});
