//! Stored-name rules (SPEC "Stored names"): a raw request path becomes a
//! checked name, and a checked name plus the content hash becomes the stored
//! name. Pure functions only: this module never touches the disk, the clock
//! or the network, so every rule is unit-tested here.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Longest name accepted, in bytes of the decoded name.
pub const MAX_NAME: usize = 1024;
/// Longest segment on PUT, so that the stored name (which adds at most
/// `_<20 digits>_<40 hex>`) still fits a 255-byte file name.
pub const MAX_PUT_SEGMENT: usize = 200;
/// Longest segment on other methods (the file system limit).
pub const MAX_SEGMENT: usize = 255;

/// Top-level names that belong to the API and are never files.
pub const RESERVED: &[&str] = &["_status"];

/// Why a name was refused; each message is the one-line reason sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("the request target must be a path starting with '/'")]
    NotAPath,
    #[error("invalid percent-encoding in the path")]
    BadPercent,
    #[error("the name is not valid UTF-8")]
    NotUtf8,
    #[error("the name contains a control character")]
    Control,
    #[error("the name has an empty path segment")]
    EmptySegment,
    #[error("'.' and '..' are not allowed as path segments")]
    DotSegment,
    #[error("a path segment may not start with '.'")]
    HiddenSegment,
    #[error("the name is longer than {MAX_NAME} bytes")]
    TooLong,
    #[error("a path segment is longer than {0} bytes")]
    SegmentTooLong(usize),
    #[error("a directory name may not have the form of a stored file name (_<digits>_<sha1>)")]
    StoredFormDirectory,
}

/// What the name is checked for: PUT has the tighter segment limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Put,
    Read,
}

/// Strict percent-decoding of a request path (without its leading `/`).
/// A `%` not followed by two hex digits, or bytes that are not UTF-8, are refused.
pub fn decode(raw: &str) -> Result<String, NameError> {
    if !raw.contains('%') {
        return Ok(raw.to_owned());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).and_then(|b| hex_val(*b));
            let lo = bytes.get(i + 2).and_then(|b| hex_val(*b));
            match (hi, lo) {
                (Some(h), Some(l)) => out.push(h << 4 | l),
                _ => return Err(NameError::BadPercent),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| NameError::NotUtf8)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decode and check a request path (`/a/b.txt`) in one step.
pub fn from_path(path: &str, purpose: Purpose) -> Result<String, NameError> {
    // Only origin-form targets name files (`*` and the like do not).
    let raw = path.strip_prefix('/').ok_or(NameError::NotAPath)?;
    let name = decode(raw)?;
    check(&name, purpose)?;
    Ok(name)
}

/// Check a decoded name against every rule of SPEC "Stored names".
pub fn check(name: &str, purpose: Purpose) -> Result<(), NameError> {
    check_with(name, purpose, true)
}

/// `check`, with names in stored form measured without their suffix
/// (`exempt_stored`) or like any other name.
fn check_with(name: &str, purpose: Purpose, exempt_stored: bool) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    // A name in stored form (a re-PUT to a Location, a replica, a read) is
    // measured by the part its uploader chose: the node itself added
    // `_<secs>_<sha1>`, and every name it stored must be accepted again by
    // its neighbours.
    let stored = if exempt_stored {
        split_stored(name)
    } else {
        None
    };
    let requested_len = stored
        .as_ref()
        .map_or(name.len(), StoredParts::requested_len);
    if requested_len > MAX_NAME {
        return Err(NameError::TooLong);
    }
    let last_limit = match (purpose, &stored) {
        (Purpose::Put, None) => MAX_PUT_SEGMENT,
        _ => MAX_SEGMENT,
    };
    let mut segments = name.split('/').peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() {
            return Err(NameError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(NameError::DotSegment);
        }
        if segment.starts_with('.') {
            return Err(NameError::HiddenSegment);
        }
        // Stored files always end in `_<digits>_<sha1>`; directories never
        // may, so a file and a directory can never claim the same path on
        // any node, and no replica can be refused for such a clash.
        if purpose == Purpose::Put && segments.peek().is_some() && split_stored(segment).is_some() {
            return Err(NameError::StoredFormDirectory);
        }
        let limit = match (purpose, segments.peek()) {
            (_, None) => last_limit,
            (Purpose::Put, Some(_)) => MAX_PUT_SEGMENT,
            (Purpose::Read, Some(_)) => MAX_SEGMENT,
        };
        if segment.len() > limit {
            return Err(NameError::SegmentTooLong(limit));
        }
    }
    Ok(())
}

/// True when the name's first segment is an API endpoint (`_status`).
pub fn is_reserved(name: &str) -> bool {
    let first = name.split('/').next().unwrap_or(name);
    RESERVED.contains(&first)
}

/// True when `name` is `dir` or lies below it (`dir` given without a
/// trailing slash).
pub fn is_within(name: &str, dir: &str) -> bool {
    name.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The parts of a name in stored form: `<stem>_<digits>_<sha1><ext>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredParts<'a> {
    /// Everything before `_<digits>_<sha1>`, directories included.
    pub stem: &'a str,
    pub secs: &'a str,
    pub sha1: &'a str,
    pub ext: &'a str,
}

impl StoredParts<'_> {
    fn requested_len(&self) -> usize {
        self.stem.len() + self.ext.len()
    }

    /// The content SHA1, lower-case hex.
    pub fn sha1_hex(&self) -> String {
        self.sha1.to_ascii_lowercase()
    }

    /// The upload time, in Unix seconds, if an HTTP date can express it.
    /// Every node derives `Last-Modified` from it, so replicas answer alike.
    pub fn upload_secs(&self) -> Option<u64> {
        self.secs.parse().ok().filter(|s| *s <= MAX_HTTP_SECS)
    }
}

/// Split a name into stem and extension: the extension is the basename's
/// last `.suffix`, and a leading dot is not an extension.
pub fn split_ext(name: &str) -> (&str, &str) {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    match name[base_start..].rfind('.') {
        Some(dot) if dot > 0 => name.split_at(base_start + dot),
        _ => (name, ""),
    }
}

/// Parse a name that already has the stored form, or None.
pub fn split_stored(name: &str) -> Option<StoredParts<'_>> {
    let (stem, ext) = split_ext(name);
    let (rest, sha1) = stem.rsplit_once('_')?;
    if sha1.len() != 40 || !sha1.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (stem, secs) = rest.rsplit_once('_')?;
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(StoredParts {
        stem,
        secs,
        sha1,
        ext,
    })
}

/// The content SHA1 (lower-case hex) a stored name carries, if it has the stored form.
pub fn content_sha1(name: &str) -> Option<String> {
    split_stored(name).map(|p| p.sha1_hex())
}

/// Last second that HTTP dates can express (9999-12-31T23:59:59Z).
pub const MAX_HTTP_SECS: u64 = 253_402_300_799;

/// The stored name for content with hash `sha1_hex` (lower-case) PUT to
/// `requested` at `now_secs`: unchanged when it already names this content,
/// otherwise `_<now>_<sha1>` goes before the extension.
pub fn stored_name(requested: &str, sha1_hex: &str, now_secs: u64) -> String {
    if let Some(parts) = split_stored(requested) {
        if parts.sha1.eq_ignore_ascii_case(sha1_hex) {
            return requested.to_string();
        }
    }
    let (stem, ext) = split_ext(requested);
    format!("{stem}_{now_secs}_{sha1_hex}{ext}")
}

/// The name a PUT of content with this SHA1 stores `requested` under. A
/// requested name that gets the suffix (not in stored form, or in stored
/// form with another content's hash) is held to the limits of any requested
/// name, and what it becomes must still fit the file system.
pub fn stored_name_checked(
    requested: &str,
    sha1_hex: &str,
    now_secs: u64,
) -> Result<String, NameError> {
    let stored = stored_name(requested, sha1_hex, now_secs);
    if stored != requested {
        check_with(requested, Purpose::Put, false)?;
        check(&stored, Purpose::Read)?;
    }
    Ok(stored)
}

/// Characters kept as they are in a `Location`: RFC 3986 unreserved ones.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `Location` header value for a stored name: `/` plus each segment percent-encoded.
pub fn location(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    for segment in name.split('/') {
        out.push('/');
        out.extend(utf8_percent_encode(segment, SEGMENT));
    }
    out
}

/// True for a valid `X-Content-SHA1` value: exactly 40 hex digits.
pub fn is_sha1_hex(value: &str) -> bool {
    value.len() == 40 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    #[test]
    fn within_a_directory_means_below_it_or_it() {
        assert!(super::is_within("q", "q"));
        assert!(super::is_within("q/state.redb", "q"));
        assert!(super::is_within("a/q/x", "a/q"));
        assert!(!super::is_within("qq/x", "q"));
        assert!(!super::is_within("a/q", "q"));
        assert!(!super::is_within("q.txt", "q"));
    }

    use super::*;

    const SHA: &str = "da39a3ee5e6b4b0d3255bfef95601890afd80709";

    #[test]
    fn decodes_percent_and_refuses_bad_escapes() {
        assert_eq!(decode("a%20b").unwrap(), "a b");
        assert_eq!(decode("h%C3%A9").unwrap(), "hé");
        assert_eq!(decode("a%2Fb").unwrap(), "a/b");
        assert_eq!(decode("%zz"), Err(NameError::BadPercent));
        assert_eq!(decode("%4"), Err(NameError::BadPercent));
        assert_eq!(decode("x%"), Err(NameError::BadPercent));
        assert_eq!(decode("%ff%fe"), Err(NameError::NotUtf8));
    }

    #[test]
    fn refuses_traversal_in_every_spelling() {
        for path in [
            "/..",
            "/../x",
            "/a/../b",
            "/%2e%2e/x",
            "/%2E%2E%2Fetc",
            "/a%2f..%2fb",
            "/./a",
            "/a/.",
        ] {
            assert_eq!(
                from_path(path, Purpose::Read),
                Err(NameError::DotSegment),
                "{path}"
            );
        }
        assert_eq!(
            from_path("/..%2f..%2fetc%2fpasswd", Purpose::Put),
            Err(NameError::DotSegment)
        );
    }

    #[test]
    fn refuses_empty_hidden_and_control() {
        assert_eq!(from_path("/", Purpose::Put), Err(NameError::Empty));
        assert_eq!(from_path("", Purpose::Read), Err(NameError::NotAPath));
        assert_eq!(from_path("*", Purpose::Put), Err(NameError::NotAPath));
        assert_eq!(from_path("a.txt", Purpose::Read), Err(NameError::NotAPath));
        assert_eq!(from_path("//a", Purpose::Put), Err(NameError::EmptySegment));
        assert_eq!(
            from_path("/a//b", Purpose::Put),
            Err(NameError::EmptySegment)
        );
        assert_eq!(from_path("/a/", Purpose::Put), Err(NameError::EmptySegment));
        assert_eq!(
            from_path("/a%2F%2Fb", Purpose::Put),
            Err(NameError::EmptySegment)
        );
        assert_eq!(
            from_path("/.profile", Purpose::Put),
            Err(NameError::HiddenSegment)
        );
        assert_eq!(
            from_path("/a/.tmp/x", Purpose::Read),
            Err(NameError::HiddenSegment)
        );
        assert_eq!(from_path("/a%00b", Purpose::Put), Err(NameError::Control));
        assert_eq!(from_path("/a%0Ab", Purpose::Put), Err(NameError::Control));
        assert_eq!(from_path("/a%7Fb", Purpose::Put), Err(NameError::Control));
        assert_eq!(
            from_path("/a%C2%85b", Purpose::Put),
            Err(NameError::Control)
        );
    }

    #[test]
    fn segment_limits_depend_on_method() {
        let s200 = "a".repeat(200);
        let s201 = "a".repeat(201);
        let s255 = "a".repeat(255);
        let s256 = "a".repeat(256);
        assert!(check(&s200, Purpose::Put).is_ok());
        assert_eq!(
            check(&s201, Purpose::Put),
            Err(NameError::SegmentTooLong(200))
        );
        assert!(check(&s255, Purpose::Read).is_ok());
        assert_eq!(
            check(&s256, Purpose::Read),
            Err(NameError::SegmentTooLong(255))
        );
    }

    #[test]
    fn every_stored_name_can_be_put_again() {
        // The longest accepted upload name yields a stored name that a
        // neighbour (or a re-PUT to the Location) must accept.
        let requested = format!(
            "{}/{}.txt",
            vec!["d".repeat(200); 4].join("/"),
            "f".repeat(196)
        );
        assert!(check(&requested, Purpose::Put).is_ok());
        let stored = stored_name(&requested, SHA, 1_795_000_000);
        assert!(stored.len() > MAX_NAME);
        assert!(stored.rsplit('/').next().unwrap().len() > MAX_PUT_SEGMENT);
        assert_eq!(check(&stored, Purpose::Put), Ok(()));
        assert_eq!(check(&stored, Purpose::Read), Ok(()));
        // Directories keep the PUT limit, stored form or not.
        let deep = format!("{}/x_1_{SHA}", "d".repeat(201));
        assert_eq!(
            check(&deep, Purpose::Put),
            Err(NameError::SegmentTooLong(200))
        );
    }

    #[test]
    fn directories_never_look_like_stored_files() {
        let dir = format!("d_1700000000_{SHA}");
        assert_eq!(
            check(&format!("{dir}/x.txt"), Purpose::Put),
            Err(NameError::StoredFormDirectory)
        );
        assert_eq!(
            check(&format!("a/{dir}.jpg/x.txt"), Purpose::Put),
            Err(NameError::StoredFormDirectory)
        );
        // Reads and deletions of such paths are plain lookups.
        assert!(check(&format!("{dir}/x.txt"), Purpose::Read).is_ok());
        // The file itself is fine, and so are directories that merely look close.
        assert!(check(&dir, Purpose::Put).is_ok());
        assert!(check(&format!("d_1700000000/x_1_{SHA}"), Purpose::Put).is_ok());
    }

    #[test]
    fn name_length_limit() {
        let long = vec!["a".repeat(100); 11].join("/"); // 1110 bytes
        assert_eq!(check(&long, Purpose::Put), Err(NameError::TooLong));
        assert_eq!(check(&long, Purpose::Read), Err(NameError::TooLong));
        let exact = format!("{}/{}", vec!["a".repeat(200); 5].join("/"), "b".repeat(19));
        assert_eq!(exact.len(), 1024);
        assert!(check(&exact, Purpose::Read).is_ok());
        // The stored form of a 1024-byte name can still be read back.
        let stored = stored_name(&format!("{}/{}", "a".repeat(100), "b".repeat(190)), SHA, 1);
        assert!(check(&stored, Purpose::Read).is_ok());
        let long_requested = format!(
            "{}/{}.txt",
            vec!["c".repeat(150); 7].join("/"),
            "d".repeat(100)
        );
        assert!(long_requested.len() > MAX_NAME);
        let stored = stored_name(&long_requested, SHA, 1);
        assert_eq!(check(&stored, Purpose::Read), Err(NameError::TooLong));
    }

    #[test]
    fn extension_rules() {
        assert_eq!(split_ext("x.tar.gz"), ("x.tar", ".gz"));
        assert_eq!(split_ext("dir.d/file"), ("dir.d/file", ""));
        assert_eq!(split_ext("a/b.png"), ("a/b", ".png"));
        assert_eq!(split_ext("noext"), ("noext", ""));
    }

    #[test]
    fn a_stored_form_name_with_another_hash_is_held_to_the_put_limits() {
        let other = "1111111111111111111111111111111111111111";
        // 150 + `_1_` + 40 = 193 bytes of which the node added nothing: fits.
        let short = format!("{}_1_{other}", "a".repeat(150));
        assert_eq!(
            stored_name_checked(&short, SHA, 7),
            Ok(format!("{short}_7_{SHA}"))
        );
        // 160 + 43 = 203 bytes: over 200 once it is an ordinary requested name,
        // although the doubly suffixed name would still fit in 255.
        let long = format!("{}_1_{other}", "a".repeat(160));
        assert_eq!(check(&long, Purpose::Put), Ok(()));
        assert_eq!(
            stored_name_checked(&long, SHA, 7),
            Err(NameError::SegmentTooLong(MAX_PUT_SEGMENT))
        );
        // With this content's hash it is kept as it is.
        let same = format!("{}_1_{SHA}", "a".repeat(200));
        assert_eq!(stored_name_checked(&same, SHA, 7), Ok(same.clone()));
    }

    #[test]
    fn stored_name_inserts_time_and_hash_before_extension() {
        assert_eq!(
            stored_name("photos/cat.jpg", SHA, 1700000000),
            format!("photos/cat_1700000000_{SHA}.jpg")
        );
        assert_eq!(stored_name("x.tar.gz", SHA, 5), format!("x.tar_5_{SHA}.gz"));
        assert_eq!(stored_name("README", SHA, 5), format!("README_5_{SHA}"));
    }

    #[test]
    fn stored_name_is_idempotent_for_its_own_content() {
        let first = stored_name("a/cat.jpg", SHA, 1700000000);
        assert_eq!(stored_name(&first, SHA, 1800000000), first);
        let upper = format!("cat_17_{}.jpg", SHA.to_uppercase());
        assert_eq!(stored_name(&upper, SHA, 99), upper);
        // Another content's hash in the name is not this content's: a new name.
        let other = "0000000000000000000000000000000000000000";
        let renamed = stored_name(&format!("cat_17_{other}.jpg"), SHA, 99);
        assert_eq!(renamed, format!("cat_17_{other}_99_{SHA}.jpg"));
    }

    #[test]
    fn parses_stored_form() {
        let name = format!("a/b_123_{SHA}.txt");
        let parts = split_stored(&name).unwrap();
        assert_eq!(parts.stem, "a/b");
        assert_eq!(parts.secs, "123");
        assert_eq!(parts.sha1, SHA);
        assert_eq!(parts.ext, ".txt");
        assert!(split_stored(&format!("b__{SHA}.txt")).is_none());
        assert!(split_stored("b_123_abc.txt").is_none());
        assert_eq!(
            content_sha1(&format!("b_1_{}", SHA.to_uppercase())).unwrap(),
            SHA
        );
    }

    #[test]
    fn upload_time_from_the_name() {
        let stored_secs = |name: &str| split_stored(name).and_then(|p| p.upload_secs());
        assert_eq!(
            stored_secs(&format!("a/b_1700000000_{SHA}.txt")),
            Some(1_700_000_000)
        );
        assert_eq!(stored_secs("plain.txt"), None);
        // Beyond what an HTTP date can say, or beyond u64: not used.
        assert_eq!(stored_secs(&format!("b_253402300800_{SHA}")), None);
        assert_eq!(
            stored_secs(&format!("b_99999999999999999999999_{SHA}")),
            None
        );
    }

    #[test]
    fn location_percent_encodes_segments() {
        assert_eq!(location("a/b c.txt"), "/a/b%20c.txt");
        assert_eq!(location("héllo.txt"), "/h%C3%A9llo.txt");
        assert_eq!(location("a-b_c~d.e"), "/a-b_c~d.e");
        assert_eq!(location("50%.txt"), "/50%25.txt");
        // Round trip through the decoder.
        let name = "dir/ünï cødé ?#.bin";
        assert_eq!(from_path(&location(name), Purpose::Read).unwrap(), name);
    }

    #[test]
    fn reserved_names() {
        assert!(is_reserved("_status"));
        assert!(is_reserved("_status/x"));
        assert!(!is_reserved("_statusx"));
        assert!(!is_reserved("a/_status"));
    }

    #[test]
    fn sha1_header_values() {
        assert!(is_sha1_hex(SHA));
        assert!(is_sha1_hex(&SHA.to_uppercase()));
        assert!(!is_sha1_hex("xyz"));
        assert!(!is_sha1_hex(&format!("{SHA}0")));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Path-like strings rich in the characters the rules care about.
    fn pathish() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just("/".to_string()),
                Just(".".to_string()),
                Just("..".to_string()),
                Just("%".to_string()),
                Just("%2e".to_string()),
                Just("%2F".to_string()),
                Just("%00".to_string()),
                Just("%C3%A9".to_string()),
                Just("%ff".to_string()),
                Just("_".to_string()),
                "[a-zA-Z0-9]{1,8}",
                "[0-9a-f]{40}",
                any::<char>().prop_map(String::from),
            ],
            0..40,
        )
        // Request paths start with `/` (hyper's origin and absolute forms);
        // one in ten does not, for the refusal of anything else.
        .prop_flat_map(|parts| {
            let path = parts.concat();
            prop_oneof![9 => Just(format!("/{path}")), 1 => Just(path)]
        })
    }

    /// A name every rule accepts: 1-4 segments of non-control characters
    /// that neither contain `/` nor start with `.`.
    fn valid_name() -> impl Strategy<Value = String> {
        let segment = "[^/.\\p{Cc}][^/\\p{Cc}]{0,20}"
            .prop_filter("control", |s: &String| !s.chars().any(char::is_control));
        proptest::collection::vec(segment, 1..5).prop_map(|segs| segs.join("/"))
    }

    fn assert_accepted_is_safe(name: &str, purpose: Purpose) {
        assert!(!name.is_empty());
        assert!(!name.chars().any(char::is_control), "{name:?}");
        let limit = match purpose {
            Purpose::Put => MAX_PUT_SEGMENT,
            Purpose::Read => MAX_SEGMENT,
        };
        for segment in name.split('/') {
            assert!(!segment.is_empty(), "{name:?}");
            assert!(segment != "." && segment != "..", "{name:?}");
            assert!(!segment.starts_with('.'), "{name:?}");
            assert!(segment.len() <= limit, "{name:?}");
        }
    }

    proptest! {
        #[test]
        fn from_path_never_panics_on_any_string(s in any::<String>()) {
            for purpose in [Purpose::Put, Purpose::Read] {
                if let Ok(name) = from_path(&s, purpose) {
                    assert_accepted_is_safe(&name, purpose);
                }
            }
        }

        #[test]
        fn accepted_path_names_are_confined(s in pathish()) {
            for purpose in [Purpose::Put, Purpose::Read] {
                if let Ok(name) = from_path(&s, purpose) {
                    assert_accepted_is_safe(&name, purpose);
                    if purpose == Purpose::Put {
                        prop_assert!(name.len() <= MAX_NAME);
                    }
                }
            }
        }

        #[test]
        fn location_round_trips_through_the_decoder(name in valid_name()) {
            prop_assert_eq!(check(&name, Purpose::Read), Ok(()));
            let loc = location(&name);
            prop_assert!(loc.starts_with('/'));
            prop_assert!(loc.bytes().all(|b| b.is_ascii_graphic()), "{}", loc);
            prop_assert_eq!(from_path(&loc, Purpose::Read), Ok(name.clone()));
            prop_assert_eq!(decode(&loc[1..]), Ok(name));
        }

        #[test]
        fn decode_of_an_accepted_name_round_trips(s in pathish()) {
            if let Ok(name) = from_path(&s, Purpose::Read) {
                prop_assert_eq!(from_path(&location(&name), Purpose::Read), Ok(name));
            }
        }

        #[test]
        fn stored_name_is_idempotent_for_its_own_sha(
            name in valid_name(),
            sha in "[0-9a-f]{40}",
            now in any::<u64>(),
            later in any::<u64>(),
        ) {
            let stored = stored_name(&name, &sha, now);
            prop_assert_eq!(content_sha1(&stored), Some(sha.clone()));
            prop_assert_eq!(stored_name(&stored, &sha, later), stored.clone());
            // The extension survives, and the directories are unchanged.
            prop_assert_eq!(split_ext(&stored).1, split_ext(&name).1);
            let dir = |n: &str| n.rfind('/').map(|i| n[..i].to_string());
            prop_assert_eq!(dir(&stored), dir(&name));
            // Upper-case hex in the name is still this content.
            let upper = stored_name(&name, &sha.to_uppercase(), now);
            prop_assert_eq!(stored_name(&upper, &sha, later), upper);
        }

        #[test]
        fn stored_name_of_other_content_is_new(
            name in valid_name(),
            a in "[0-9a-f]{40}",
            b in "[0-9a-f]{40}",
            now in any::<u64>(),
        ) {
            prop_assume!(a != b);
            let first = stored_name(&name, &a, now);
            let second = stored_name(&first, &b, now);
            prop_assert_ne!(&second, &first);
            prop_assert_eq!(content_sha1(&second), Some(b));
        }
    }
}
