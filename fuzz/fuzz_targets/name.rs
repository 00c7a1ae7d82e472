//! Stored-name parsing: any request path either is refused or yields a
//! name that stays inside the storage directory.
#![no_main]

use cockatiel::name::{self, Purpose};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for purpose in [Purpose::Put, Purpose::Read] {
        if let Ok(name) = name::from_path(path, purpose) {
            assert!(!name.is_empty());
            assert!(!name.chars().any(char::is_control), "{name:?}");
            for segment in name.split('/') {
                assert!(!segment.is_empty(), "{name:?}");
                assert!(!segment.starts_with('.'), "{name:?}");
            }
            // The Location of an accepted name decodes back to it.
            assert_eq!(
                name::from_path(&name::location(&name), Purpose::Read).as_deref(),
                Ok(name.as_str())
            );
        }
    }
});
