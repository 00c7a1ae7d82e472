//! `Range` request headers (RFC 9110 §14): parse a header against a file
//! length into what to send. Pure; the handler does the I/O.

/// What to answer for a `Range` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeAnswer {
    /// Ignore the header and send the whole file (invalid syntax, other
    /// units, too many ranges).
    Full,
    /// 206 with bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 206 `multipart/byteranges` with these parts (`start`, `end`
    /// inclusive), none overlapping or close together, in the order the
    /// header asked for them (a coalesced part where its first range was).
    Several(Vec<(u64, u64)>),
    /// 416: no range overlaps the file.
    Unsatisfiable,
}

/// More ranges than this in one header is abuse; the header is ignored.
const MAX_RANGES: usize = 64;

/// Ranges separated by at most this many bytes are sent as one: less than
/// the part headers of a multipart answer would cost (RFC 9110 §14.2 lets
/// a server coalesce such ranges).
const COALESCE_GAP: u64 = 80;

/// Evaluate a `Range` header value for a file of `len` bytes.
pub fn evaluate(header: &str, len: u64) -> RangeAnswer {
    let Some((unit, set)) = header.trim().split_once('=') else {
        return RangeAnswer::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeAnswer::Full;
    }
    // Each range with its place in the header.
    let mut ranges: Vec<(u64, u64, usize)> = Vec::new();
    let mut count = 0;
    for spec in set.split(',') {
        let spec = spec.trim();
        if spec.is_empty() {
            continue; // RFC 9110 list syntax allows empty elements
        }
        count += 1;
        if count > MAX_RANGES {
            return RangeAnswer::Full;
        }
        let Some(parsed) = parse_spec(spec) else {
            return RangeAnswer::Full;
        };
        if let Some((s, e)) = resolve(parsed, len) {
            ranges.push((s, e, count));
        }
    }
    if count == 0 {
        return RangeAnswer::Full;
    }
    if ranges.is_empty() {
        return RangeAnswer::Unsatisfiable;
    }
    // Ranges that overlap or lie close together become one part (RFC 9110
    // §14.2 lets a server coalesce them); the parts keep the header's order.
    ranges.sort_unstable();
    let mut parts: Vec<(u64, u64, usize)> = Vec::with_capacity(ranges.len());
    for (s, e, at) in ranges {
        match parts.last_mut() {
            Some((_, end, first)) if s <= end.saturating_add(1).saturating_add(COALESCE_GAP) => {
                *end = (*end).max(e);
                *first = (*first).min(at);
            }
            _ => parts.push((s, e, at)),
        }
    }
    parts.sort_unstable_by_key(|&(_, _, at)| at);
    match parts.as_slice() {
        [(start, end, _)] => RangeAnswer::Partial {
            start: *start,
            end: *end,
        },
        _ => RangeAnswer::Several(parts.into_iter().map(|(s, e, _)| (s, e)).collect()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    /// `first-` or `first-last`
    From(u64, Option<u64>),
    /// `-suffix`
    Suffix(u64),
}

fn parse_spec(spec: &str) -> Option<Spec> {
    let (first, last) = spec.split_once('-')?;
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            // Saturate absurdly long numbers instead of refusing them.
            Some(s.parse().unwrap_or(u64::MAX))
        }
    };
    if first.is_empty() {
        return Some(Spec::Suffix(num(last)?));
    }
    let first = num(first)?;
    if last.is_empty() {
        return Some(Spec::From(first, None));
    }
    let last = num(last)?;
    if last < first {
        return None;
    }
    Some(Spec::From(first, Some(last)))
}

fn resolve(spec: Spec, len: u64) -> Option<(u64, u64)> {
    match spec {
        Spec::From(first, last) => {
            if first >= len {
                return None;
            }
            let end = last.map_or(len - 1, |l| l.min(len - 1));
            Some((first, end))
        }
        Spec::Suffix(0) => None,
        Spec::Suffix(n) => {
            if len == 0 {
                return None;
            }
            Some((len.saturating_sub(n), len - 1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeAnswer::*;

    #[test]
    fn single_ranges() {
        assert_eq!(evaluate("bytes=0-3", 10), Partial { start: 0, end: 3 });
        assert_eq!(evaluate("bytes=5-", 10), Partial { start: 5, end: 9 });
        assert_eq!(evaluate("bytes=-4", 10), Partial { start: 6, end: 9 });
        assert_eq!(evaluate("bytes=-40", 10), Partial { start: 0, end: 9 });
        assert_eq!(evaluate("bytes=8-100", 10), Partial { start: 8, end: 9 });
        assert_eq!(evaluate("BYTES = 1-1", 10), Partial { start: 1, end: 1 });
    }

    #[test]
    fn unsatisfiable() {
        assert_eq!(evaluate("bytes=10-", 10), Unsatisfiable);
        assert_eq!(evaluate("bytes=1000-2000", 10), Unsatisfiable);
        assert_eq!(evaluate("bytes=-0", 10), Unsatisfiable);
        assert_eq!(evaluate("bytes=0-", 0), Unsatisfiable);
        assert_eq!(evaluate("bytes=-5", 0), Unsatisfiable);
        assert_eq!(evaluate("bytes=20-30,40-", 10), Unsatisfiable);
    }

    #[test]
    fn invalid_syntax_is_ignored() {
        for h in [
            "",
            "bytes",
            "bytes=",
            "bytes=a-b",
            "bytes=5-2",
            "items=0-1",
            "bytes=--1",
            "bytes=1",
            "bytes=0-1,x",
        ] {
            assert_eq!(evaluate(h, 10), Full, "{h:?}");
        }
    }

    #[test]
    fn multiple_ranges_merge_or_come_as_parts() {
        assert_eq!(evaluate("bytes=0-1,2-3", 10), Partial { start: 0, end: 3 });
        assert_eq!(evaluate("bytes=4-6,0-5", 10), Partial { start: 0, end: 6 });
        assert_eq!(
            evaluate("bytes=0-1,50-60", 10),
            Partial { start: 0, end: 1 }
        );
        // Close together: one part covering both.
        assert_eq!(evaluate("bytes=0-1,5-6", 10), Partial { start: 0, end: 6 });
        assert_eq!(evaluate("bytes=0-1,3-4", 6), Partial { start: 0, end: 4 });
        assert_eq!(
            evaluate("bytes=0-0,81-90", 1000),
            Partial { start: 0, end: 90 }
        );
        // Farther apart: parts of their own, in the header's order.
        assert_eq!(
            evaluate("bytes=0-0,82-90", 1000),
            Several(vec![(0, 0), (82, 90)])
        );
        assert_eq!(
            evaluate("bytes=500-509,0-9,505-600", 1000),
            Several(vec![(500, 600), (0, 9)])
        );
        let many = format!("bytes={}", vec!["0-1"; 65].join(","));
        assert_eq!(evaluate(&many, 10), Full);
    }

    #[test]
    fn huge_numbers_do_not_overflow() {
        assert_eq!(
            evaluate("bytes=0-99999999999999999999999", 10),
            Partial { start: 0, end: 9 }
        );
        assert_eq!(
            evaluate("bytes=99999999999999999999999-", 10),
            Unsatisfiable
        );
        assert_eq!(
            evaluate("bytes=-99999999999999999999999", 10),
            Partial { start: 0, end: 9 }
        );
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Header values that look like byte ranges, with the odd twist.
    fn rangeish() -> impl Strategy<Value = String> {
        let number = prop_oneof![
            (0u64..64).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            Just("99999999999999999999999".to_string()),
            Just(String::new()),
            Just("x".to_string()),
        ];
        let spec = (
            number.clone(),
            prop_oneof![Just("-"), Just("--"), Just("")],
            number,
        )
            .prop_map(|(a, dash, b)| format!("{a}{dash}{b}"));
        (
            prop_oneof![Just("bytes="), Just("BYTES ="), Just("items="), Just("")],
            proptest::collection::vec(spec, 0..6),
            prop_oneof![Just(","), Just(", "), Just(",,")],
        )
            .prop_map(|(unit, specs, sep)| format!("{unit}{}", specs.join(sep)))
    }

    fn check_answer(header: &str, len: u64) {
        match evaluate(header, len) {
            RangeAnswer::Partial { start, end } => {
                assert!(start <= end, "{header:?} len {len}: {start}-{end}");
                assert!(end < len, "{header:?} len {len}: {start}-{end}");
            }
            RangeAnswer::Several(parts) => {
                assert!(parts.len() >= 2, "{header:?}: {parts:?}");
                let mut parts = parts;
                parts.sort_unstable();
                for w in parts.windows(2) {
                    assert!(w[0].1 + 1 + COALESCE_GAP < w[1].0, "{header:?}: {parts:?}");
                }
                for &(start, end) in &parts {
                    assert!(start <= end && end < len, "{header:?} len {len}: {parts:?}");
                }
            }
            RangeAnswer::Full | RangeAnswer::Unsatisfiable => {}
        }
    }

    proptest! {
        #[test]
        fn evaluate_never_panics_on_any_string(header in any::<String>(), len in any::<u64>()) {
            check_answer(&header, len);
            check_answer(&header, len % 100);
        }

        #[test]
        fn partial_answers_lie_within_the_file(header in rangeish(), len in 0u64..100) {
            check_answer(&header, len);
            check_answer(&header, u64::MAX - len);
        }

        #[test]
        fn a_valid_single_range_is_served_exactly(len in 1u64..10_000, a in any::<u64>(), b in any::<u64>()) {
            let (first, last) = (a % len, b % len);
            let (first, last) = (first.min(last), first.max(last));
            prop_assert_eq!(
                evaluate(&format!("bytes={first}-{last}"), len),
                RangeAnswer::Partial { start: first, end: last }
            );
            prop_assert_eq!(
                evaluate(&format!("bytes={first}-"), len),
                RangeAnswer::Partial { start: first, end: len - 1 }
            );
            prop_assert_eq!(
                evaluate(&format!("bytes={}-", len + first), len),
                RangeAnswer::Unsatisfiable
            );
        }
    }
}
