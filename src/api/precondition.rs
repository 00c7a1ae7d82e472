//! `If-None-Match` (RFC 9110 §13.1.2): does a header value match our ETag?
//! Weak comparison as the RFC asks for this header. And whether a request
//! asks for `no-cache` (RFC 9111 §5.2.1.4, or HTTP/1.0's `Pragma`). Pure.

/// True when `header` (an `If-None-Match` value) matches `etag`, the
/// quoted strong entity tag of the file: `*`, or any listed tag whose opaque
/// part equals ours, with or without `W/`. Unparsable elements never match.
pub fn none_match(header: &str, etag: &str) -> bool {
    let ours = etag.trim_matches('"');
    let header = header.trim();
    if header == "*" {
        return true;
    }
    split_list(header).any(|tag| {
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        match tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            Some(opaque) => opaque == ours,
            // Some clients send the tag without quotes; accept it.
            None => !tag.contains('"') && tag == ours,
        }
    })
}

/// True when the `Cache-Control` values ask for `no-cache`, or there are
/// none and a `Pragma` value does (RFC 9111 §5.4).
pub fn no_cache<'a>(
    cache_control: impl Iterator<Item = &'a str>,
    pragma: impl Iterator<Item = &'a str>,
) -> bool {
    let says_no_cache = |value: &str| {
        split_list(value).any(|d| {
            let directive = d.split_once('=').map_or(d, |(k, _)| k).trim();
            directive.eq_ignore_ascii_case("no-cache")
        })
    };
    let mut cache_control = cache_control.peekable();
    if cache_control.peek().is_none() {
        pragma.into_iter().any(says_no_cache)
    } else {
        cache_control.any(says_no_cache)
    }
}

/// Split a comma-separated list of entity tags, keeping commas inside quotes.
fn split_list(header: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut in_quotes = false;
    let mut start = 0;
    for (i, c) in header.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                parts.push(&header[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&header[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETAG: &str = "\"abc123\"";

    fn nc(cc: &[&str], pragma: &[&str]) -> bool {
        no_cache(cc.iter().copied(), pragma.iter().copied())
    }

    #[test]
    fn no_cache_directive() {
        assert!(nc(&["no-cache"], &[]));
        assert!(nc(&["max-age=0, No-Cache"], &[]));
        assert!(nc(&["max-age=0", "no-cache"], &[]));
        assert!(nc(&["no-cache=\"set-cookie\""], &[]));
        assert!(nc(&[], &["no-cache"]));
        assert!(!nc(&[], &[]));
        assert!(!nc(&["max-age=0"], &[]));
        assert!(!nc(&["no-store, no-cachex"], &[]));
        assert!(!nc(&["private=\"no-cache\""], &[]));
        // Cache-Control, when present, wins over Pragma.
        assert!(!nc(&["max-age=10"], &["no-cache"]));
    }

    #[test]
    fn matches() {
        assert!(none_match("\"abc123\"", ETAG));
        assert!(none_match("*", ETAG));
        assert!(none_match(" * ", ETAG));
        assert!(none_match("W/\"abc123\"", ETAG));
        assert!(none_match("\"x\", \"abc123\"", ETAG));
        assert!(none_match("\"x,y\",W/\"abc123\"", ETAG));
        assert!(none_match("abc123", ETAG));
    }

    #[test]
    fn does_not_match() {
        assert!(!none_match("\"abc12\"", ETAG));
        assert!(!none_match("\"abc123", ETAG));
        assert!(!none_match("", ETAG));
        assert!(!none_match(",,", ETAG));
        assert!(!none_match("\"x\", \"y\"", ETAG));
        assert!(!none_match("\"abc123,\"", ETAG));
        assert!(!none_match("w/\"abc\"", ETAG));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Entity-tag lists with quotes, weak prefixes and commas in odd places.
    fn tag_list() -> impl Strategy<Value = String> {
        let tag = prop_oneof![
            "[0-9a-f]{1,40}".prop_map(|t| format!("\"{t}\"")),
            "[0-9a-f]{1,40}".prop_map(|t| format!("W/\"{t}\"")),
            "[ ,\"W/*a-f]{0,12}",
            any::<String>(),
        ];
        proptest::collection::vec(tag, 0..6).prop_map(|tags| tags.join(","))
    }

    proptest! {
        #[test]
        fn never_panics(header in any::<String>(), etag in any::<String>()) {
            let _ = none_match(&header, &etag);
        }

        #[test]
        fn never_panics_on_tag_lists(header in tag_list(), opaque in "[0-9a-f]{40}") {
            let _ = none_match(&header, &format!("\"{opaque}\""));
        }

        #[test]
        fn star_and_our_own_tag_always_match(opaque in "[0-9a-f]{40}", others in tag_list()) {
            let etag = format!("\"{opaque}\"");
            let weak = format!("W/{etag}");
            let padded = format!(" {etag} ");
            prop_assert!(none_match("*", &etag));
            prop_assert!(none_match(&etag, &etag));
            prop_assert!(none_match(&weak, &etag));
            prop_assert!(none_match(&padded, &etag));
            // Our tag after a well-formed list of other tags still matches.
            let wellformed = others
                .split(',')
                .filter(|t| t.starts_with('"') || t.starts_with("W/\""))
                .filter(|t| t.ends_with('"') && t.matches('"').count() == 2)
                .collect::<Vec<_>>()
                .join(", ");
            let list = if wellformed.is_empty() {
                etag.clone()
            } else {
                format!("{wellformed}, {etag}")
            };
            prop_assert!(none_match(&list, &etag), "{}", list);
        }

        #[test]
        fn other_strong_tags_never_match(opaque in "[0-9a-f]{40}", other in "[0-9a-f]{1,39}") {
            let etag = format!("\"{opaque}\"");
            let strong = format!("\"{other}\"");
            let list = format!("W/\"{other}\", \"{other}g\"");
            prop_assert!(!none_match(&strong, &etag));
            prop_assert!(!none_match(&list, &etag));
        }
    }
}
