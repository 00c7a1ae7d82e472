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
