use std::fmt;

/// A room: the part of the site a visitor was seen in (a forum, a thread,
/// a page). Presence is kept per room as well as site-wide.
///
/// 1 to 128 bytes of UTF-8 without control characters. Control characters
/// are refused because they could never be shown, and because the service
/// uses them as separators in its own messages.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Room(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("must be at most {max} bytes, got {0}", max = Room::MAX_BYTES)]
    TooLong(usize),
    #[error("must not contain control characters")]
    ControlCharacter,
}

impl Room {
    pub const MAX_BYTES: usize = 128;

    /// A room name as a client sent it. The empty string is not a room but
    /// the whole site: see [`Scope::parse`].
    fn parse(name: String) -> Result<Self, RoomError> {
        if name.len() > Self::MAX_BYTES {
            return Err(RoomError::TooLong(name.len()));
        }
        if name.chars().any(char::is_control) {
            return Err(RoomError::ControlCharacter);
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where presence is counted: the whole site, or one room.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Site,
    Room(Room),
}

impl Scope {
    /// `""` is the whole site, so callers that know nothing of rooms keep
    /// working; anything else must be a valid room name.
    pub fn parse(name: String) -> Result<Self, RoomError> {
        if name.is_empty() {
            Ok(Scope::Site)
        } else {
            Room::parse(name).map(Scope::Room)
        }
    }

    pub fn room(&self) -> Option<&Room> {
        match self {
            Scope::Site => None,
            Scope::Room(room) => Some(room),
        }
    }

    /// The scope's name on the wire: `""` for the site.
    pub fn as_str(&self) -> &str {
        self.room().map_or("", Room::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(name: &str) -> Result<Scope, RoomError> {
        Scope::parse(name.to_owned())
    }

    #[test]
    fn the_empty_name_is_the_whole_site() {
        assert_eq!(parse(""), Ok(Scope::Site));
    }

    #[test]
    fn ordinary_room_names_are_kept_as_given() {
        for name in ["forum/42", "thread: Rust & Go", " spaced ", "名前", "{tag}", "a"] {
            assert_eq!(parse(name).map(|s| s.as_str().to_owned()), Ok(name.to_owned()));
        }
    }

    #[test]
    fn a_room_of_128_bytes_is_accepted_and_one_of_129_is_refused() {
        assert!(parse(&"r".repeat(128)).is_ok());
        assert_eq!(parse(&"r".repeat(129)), Err(RoomError::TooLong(129)));
    }

    #[test]
    fn room_names_with_control_characters_are_refused() {
        for name in ["a\nb", "\0", "tab\t", "\u{7f}", "\u{85}"] {
            assert_eq!(parse(name), Err(RoomError::ControlCharacter), "{name:?}");
        }
    }

    proptest! {
        #[test]
        fn any_accepted_room_round_trips(name in "\\PC{0,140}") {
            if let Ok(scope) = parse(&name) {
                prop_assert_eq!(scope.as_str(), name.as_str());
                prop_assert!(name.len() <= Room::MAX_BYTES);
            }
        }
    }
}
