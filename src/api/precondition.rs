//! `If-None-Match` (RFC 9110 §13.1.2): does a header value match our ETag?
//! Pure; weak comparison as the RFC asks for this header.

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
