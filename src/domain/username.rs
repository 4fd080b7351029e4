use std::fmt;

/// The name of a signed-in user, as callers report it.
///
/// 1 to 256 bytes of UTF-8, no control characters, no leading or trailing
/// whitespace. The rules keep names printable in any dashboard and make
/// `" alice"` and `"alice"` impossible to confuse.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Username(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {max} bytes, got {0}", max = Username::MAX_BYTES)]
    TooLong(usize),
    #[error("must not contain control characters")]
    ControlCharacter,
    #[error("must not start or end with whitespace")]
    SurroundingWhitespace,
}

impl Username {
    pub const MAX_BYTES: usize = 256;

    pub fn parse(name: String) -> Result<Self, UsernameError> {
        if name.is_empty() {
            return Err(UsernameError::Empty);
        }
        if name.len() > Self::MAX_BYTES {
            return Err(UsernameError::TooLong(name.len()));
        }
        if name.chars().any(char::is_control) {
            return Err(UsernameError::ControlCharacter);
        }
        if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
            return Err(UsernameError::SurroundingWhitespace);
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Username {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(name: &str) -> Result<Username, UsernameError> {
        Username::parse(name.to_owned())
    }

    #[test]
    fn ordinary_names_are_accepted_as_given() {
        for name in ["alice", "Bob Smith", "名前", "a", "o'brien@example.com", "x y\u{a0}z"] {
            assert_eq!(parse(name).map(|n| n.to_string()), Ok(name.to_owned()), "{name:?}");
        }
    }

    #[test]
    fn an_empty_name_is_rejected() {
        assert_eq!(parse(""), Err(UsernameError::Empty));
    }

    #[test]
    fn a_name_of_256_bytes_is_accepted_and_one_of_257_is_rejected() {
        assert!(parse(&"a".repeat(256)).is_ok());
        assert_eq!(parse(&"a".repeat(257)), Err(UsernameError::TooLong(257)));
    }

    #[test]
    fn the_limit_counts_bytes_not_characters() {
        // 86 three-byte characters are 258 bytes.
        assert_eq!(parse(&"名".repeat(86)), Err(UsernameError::TooLong(258)));
        assert!(parse(&"名".repeat(85)).is_ok());
    }

    #[test]
    fn names_with_control_characters_are_rejected() {
        for name in ["a\nb", "a\tb", "nul\0", "\u{7f}del", "c1\u{85}", "bell\u{7}x"] {
            assert_eq!(parse(name), Err(UsernameError::ControlCharacter), "{name:?}");
        }
    }

    #[test]
    fn names_with_leading_or_trailing_whitespace_are_rejected() {
        for name in [" alice", "alice ", "\u{a0}alice", "alice\u{3000}", " "] {
            assert_eq!(parse(name), Err(UsernameError::SurroundingWhitespace), "{name:?}");
        }
    }

    proptest! {
        #[test]
        fn any_accepted_name_round_trips_unchanged(name in "\\PC{0,300}") {
            if let Ok(parsed) = parse(&name) {
                prop_assert_eq!(parsed.as_str(), name.as_str());
                prop_assert!(!name.is_empty() && name.len() <= Username::MAX_BYTES);
            }
        }

        #[test]
        fn names_of_printable_ascii_letters_are_accepted(name in "[a-zA-Z0-9_.-]{1,256}") {
            prop_assert!(parse(&name).is_ok());
        }
    }
}
