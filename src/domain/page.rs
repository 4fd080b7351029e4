//! Paging, after Google's API design guide (AIP-158): a page size that is
//! coerced rather than refused, and an opaque token that carries where the
//! last page ended.
//!
//! A token is the position reached, by name, in each list. Paging by name
//! rather than by offset is what keeps a walk honest while the lists move
//! under it: a name online during the whole walk is met exactly once, even
//! when a rotation moves every name from *current* to *old* between two
//! pages, and no name is ever met twice.
//!
//! The token is base64url of a small binary record with a checksum, so a
//! string that is not one of ours is refused (INVALID_ARGUMENT naming
//! `page_token`) instead of being misread. It is not secret: it holds only a
//! name the caller has already been given.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

use super::Scope;

/// How many entries a page holds at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSize(usize);

impl PageSize {
    pub const DEFAULT: usize = 100;
    pub const MAX: usize = 1000;

    /// 0 means the default; anything above the maximum is taken as the
    /// maximum (AIP-158: coerce, don't refuse).
    pub fn coerce(requested: u32) -> Self {
        match usize::try_from(requested) {
            Ok(0) => Self(Self::DEFAULT),
            Ok(n) => Self(n.min(Self::MAX)),
            Err(_) => Self(Self::MAX),
        }
    }

    pub fn get(self) -> usize {
        self.0
    }
}

/// Where one list's walk stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Cursor {
    /// Nothing read yet.
    #[default]
    Start,
    /// Everything up to and including this name has been returned.
    After(String),
    /// The list is done.
    Done,
}

impl Cursor {
    pub fn is_done(&self) -> bool {
        matches!(self, Cursor::Done)
    }

    /// The last name returned, if any: the next page starts after it.
    pub fn after(&self) -> Option<&str> {
        match self {
            Cursor::After(name) => Some(name),
            _ => None,
        }
    }
}

/// Why a page token was refused. The message never echoes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageTokenError {
    #[error("is not a page token of this service")]
    NotOurs,
    #[error("belongs to another request (a different room or order)")]
    OtherRequest,
}

/// The walk of `ListOnline` through one scope: users and guests, each on
/// its own cursor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OnlinePageToken {
    pub users: Cursor,
    pub guests: Cursor,
}

/// The walk of `ListRooms`, in one order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RoomsPageToken {
    /// By name: the last room returned.
    ByName { after: String },
    /// Busiest first: the users count and name of the last room returned.
    ByUsers { users: u64, after: String },
}

/// What kind of walk a token belongs to: a token of one kind is refused by
/// the other call.
const ONLINE: u8 = 1;
const ROOMS_BY_NAME: u8 = 2;
const ROOMS_BY_USERS: u8 = 3;
const VERSION: u8 = 1;

/// Longer than any token we make (two 256-byte names, base64): anything
/// longer is not ours, and is refused before any decoding work.
const MAX_TOKEN_CHARS: usize = 2048;

impl OnlinePageToken {
    /// `""` is the first page. A token is bound to its scope, so a token of
    /// one room cannot be replayed against another.
    pub fn parse(token: &str, scope: &Scope) -> Result<Self, PageTokenError> {
        if token.is_empty() {
            return Ok(Self::default());
        }
        let mut reader = Reader::open(token, ONLINE)?;
        if reader.u32()? != fingerprint(scope.as_str()) {
            return Err(PageTokenError::OtherRequest);
        }
        let users = reader.cursor()?;
        let guests = reader.cursor()?;
        reader.finish()?;
        Ok(Self { users, guests })
    }

    /// The token for the next page, or `""` when both lists are done.
    pub fn encode(&self, scope: &Scope) -> String {
        if self.users.is_done() && self.guests.is_done() {
            return String::new();
        }
        let mut writer = Writer::new(ONLINE);
        writer.u32(fingerprint(scope.as_str()));
        writer.cursor(&self.users);
        writer.cursor(&self.guests);
        writer.finish()
    }
}

impl RoomsPageToken {
    /// `""` is the first page (`None`). A token of the other order is refused.
    pub fn parse(token: &str, by_users: bool) -> Result<Option<Self>, PageTokenError> {
        if token.is_empty() {
            return Ok(None);
        }
        let kind = if by_users { ROOMS_BY_USERS } else { ROOMS_BY_NAME };
        let mut reader = Reader::open(token, kind)?;
        let parsed = if by_users {
            let users = reader.u64()?;
            RoomsPageToken::ByUsers {
                users,
                after: reader.string()?,
            }
        } else {
            RoomsPageToken::ByName {
                after: reader.string()?,
            }
        };
        reader.finish()?;
        Ok(Some(parsed))
    }

    pub fn encode(&self) -> String {
        match self {
            RoomsPageToken::ByName { after } => {
                let mut writer = Writer::new(ROOMS_BY_NAME);
                writer.string(after);
                writer.finish()
            }
            RoomsPageToken::ByUsers { users, after } => {
                let mut writer = Writer::new(ROOMS_BY_USERS);
                writer.u64(*users);
                writer.string(after);
                writer.finish()
            }
        }
    }
}

/// FNV-1a, 64 bits: a checksum against strings that are not our tokens
/// (not against forgery: a forged token could only name a place to start).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn fingerprint(scope: &str) -> u32 {
    // Truncation is the point: a short tag of the scope.
    (fnv1a(scope.as_bytes()) >> 32) as u32
}

struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: u8) -> Self {
        Self(vec![VERSION, kind])
    }

    fn u32(&mut self, value: u32) {
        self.0.extend_from_slice(&value.to_be_bytes());
    }

    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_be_bytes());
    }

    fn string(&mut self, value: &str) {
        // Names are at most a few hundred bytes: a u16 length is plenty.
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(&value.as_bytes()[..usize::from(len)]);
    }

    fn cursor(&mut self, cursor: &Cursor) {
        match cursor {
            Cursor::Start => self.0.push(0),
            Cursor::After(name) => {
                self.0.push(1);
                self.string(name);
            }
            Cursor::Done => self.0.push(2),
        }
    }

    fn finish(mut self) -> String {
        let checksum = fnv1a(&self.0);
        self.0.extend_from_slice(&checksum.to_be_bytes()[..4]);
        URL_SAFE_NO_PAD.encode(&self.0)
    }
}

struct Reader {
    bytes: Vec<u8>,
    at: usize,
}

impl Reader {
    fn open(token: &str, kind: u8) -> Result<Self, PageTokenError> {
        if token.len() > MAX_TOKEN_CHARS {
            return Err(PageTokenError::NotOurs);
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| PageTokenError::NotOurs)?;
        let body_len = bytes.len().checked_sub(4).ok_or(PageTokenError::NotOurs)?;
        let (body, checksum) = bytes.split_at(body_len);
        if checksum != &fnv1a(body).to_be_bytes()[..4] {
            return Err(PageTokenError::NotOurs);
        }
        match body {
            [VERSION, found, ..] if *found == kind => {}
            [VERSION, ONLINE | ROOMS_BY_NAME | ROOMS_BY_USERS, ..] => return Err(PageTokenError::OtherRequest),
            _ => return Err(PageTokenError::NotOurs),
        }
        let bytes = body.to_vec();
        Ok(Self { bytes, at: 2 })
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PageTokenError> {
        let end = self.at.checked_add(n).ok_or(PageTokenError::NotOurs)?;
        let slice = self.bytes.get(self.at..end).ok_or(PageTokenError::NotOurs)?;
        self.at = end;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32, PageTokenError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes(
            bytes.try_into().map_err(|_| PageTokenError::NotOurs)?,
        ))
    }

    fn u64(&mut self) -> Result<u64, PageTokenError> {
        let bytes = self.take(8)?;
        Ok(u64::from_be_bytes(
            bytes.try_into().map_err(|_| PageTokenError::NotOurs)?,
        ))
    }

    fn string(&mut self) -> Result<String, PageTokenError> {
        let len = self.take(2)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let bytes = self.take(len)?.to_vec();
        String::from_utf8(bytes).map_err(|_| PageTokenError::NotOurs)
    }

    fn cursor(&mut self) -> Result<Cursor, PageTokenError> {
        match self.take(1)?[0] {
            0 => Ok(Cursor::Start),
            1 => Ok(Cursor::After(self.string()?)),
            2 => Ok(Cursor::Done),
            _ => Err(PageTokenError::NotOurs),
        }
    }

    fn finish(self) -> Result<(), PageTokenError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(PageTokenError::NotOurs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn room(name: &str) -> Scope {
        Scope::parse(name.to_owned()).expect("a valid room")
    }

    #[test]
    fn page_sizes_are_coerced_not_refused() {
        assert_eq!(PageSize::coerce(0).get(), 100);
        assert_eq!(PageSize::coerce(1).get(), 1);
        assert_eq!(PageSize::coerce(1000).get(), 1000);
        assert_eq!(PageSize::coerce(1001).get(), 1000);
        assert_eq!(PageSize::coerce(u32::MAX).get(), 1000);
    }

    #[test]
    fn the_empty_token_is_the_first_page_and_a_finished_walk_gives_the_empty_token() {
        assert_eq!(OnlinePageToken::parse("", &Scope::Site), Ok(OnlinePageToken::default()));
        let done = OnlinePageToken {
            users: Cursor::Done,
            guests: Cursor::Done,
        };
        assert_eq!(done.encode(&Scope::Site), "");
    }

    #[test]
    fn a_token_reads_back_as_it_was_written() {
        let token = OnlinePageToken {
            users: Cursor::After("émile".into()),
            guests: Cursor::Done,
        };
        let scope = room("forum/1");
        assert_eq!(OnlinePageToken::parse(&token.encode(&scope), &scope), Ok(token));
    }

    #[test]
    fn a_token_of_another_room_is_refused() {
        let token = OnlinePageToken {
            users: Cursor::After("a".into()),
            guests: Cursor::Start,
        }
        .encode(&room("one"));
        assert_eq!(
            OnlinePageToken::parse(&token, &room("two")),
            Err(PageTokenError::OtherRequest)
        );
    }

    #[test]
    fn strings_that_are_not_our_tokens_are_refused() {
        let real = OnlinePageToken {
            users: Cursor::After("a".into()),
            guests: Cursor::Start,
        }
        .encode(&Scope::Site);
        let mut altered = real.clone().into_bytes();
        altered[3] = if altered[3] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).expect("ascii");
        for bad in ["x", "not a token", "AAAA", "////", &"A".repeat(5000), &altered] {
            assert_eq!(
                OnlinePageToken::parse(bad, &Scope::Site),
                Err(PageTokenError::NotOurs),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_rooms_token_is_not_a_list_token_and_orders_do_not_mix() {
        let by_name = RoomsPageToken::ByName { after: "a".into() }.encode();
        assert_eq!(
            OnlinePageToken::parse(&by_name, &Scope::Site),
            Err(PageTokenError::OtherRequest)
        );
        assert_eq!(RoomsPageToken::parse(&by_name, true), Err(PageTokenError::OtherRequest));
        let by_users = RoomsPageToken::ByUsers {
            users: 7,
            after: "r".into(),
        };
        assert_eq!(RoomsPageToken::parse(&by_users.encode(), true), Ok(Some(by_users)));
    }

    proptest! {
        #[test]
        fn parsing_any_string_never_panics(token in "\\PC{0,300}") {
            let _ = OnlinePageToken::parse(&token, &Scope::Site);
            let _ = RoomsPageToken::parse(&token, true);
            let _ = RoomsPageToken::parse(&token, false);
        }

        #[test]
        fn any_cursor_round_trips(name in "\\PC{1,256}", done in any::<bool>()) {
            let token = OnlinePageToken {
                users: Cursor::After(name),
                guests: if done { Cursor::Done } else { Cursor::Start },
            };
            prop_assert_eq!(OnlinePageToken::parse(&token.encode(&Scope::Site), &Scope::Site), Ok(token));
        }
    }
}
