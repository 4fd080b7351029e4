//! Values that exist past the gRPC edge. Each is parsed once from what a
//! client sent; code that holds one knows it is valid.

mod guest_address;
mod page;
mod room;
mod username;

use std::fmt;

pub use guest_address::{GuestAddress, GuestAddressError};
pub use page::{Cursor, OnlinePageToken, PageSize, PageTokenError, RoomsPageToken};
pub use room::{Room, RoomError, Scope};
pub use username::{Username, UsernameError};

/// The two kinds of visitors, each with its own lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Users,
    Guests,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Users, Kind::Guests];

    /// The kind's name in keys, messages, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Users => "users",
            Kind::Guests => "guests",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "users" => Some(Kind::Users),
            "guests" => Some(Kind::Guests),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everyone one call names: signed-in users and guests, already valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Visitors {
    pub users: Vec<Username>,
    pub guests: Vec<GuestAddress>,
}

impl Visitors {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.guests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.users.len() + self.guests.len()
    }

    /// The names of one kind, as stored.
    pub fn names(&self, kind: Kind) -> Vec<&str> {
        match kind {
            Kind::Users => self.users.iter().map(Username::as_str).collect(),
            Kind::Guests => self.guests.iter().map(GuestAddress::as_str).collect(),
        }
    }
}

/// How many are online in a scope, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub users: u64,
    pub guests: u64,
}

impl Counts {
    pub fn of(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Users => self.users,
            Kind::Guests => self.guests,
        }
    }

    pub fn set(&mut self, kind: Kind, count: u64) {
        match kind {
            Kind::Users => self.users = count,
            Kind::Guests => self.guests = count,
        }
    }
}

/// One page of one kind: names in ascending byte order, after the cursor
/// they were asked for; the exact total; and whether the list is done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindPage {
    pub names: Vec<String>,
    pub total: u64,
    pub done: bool,
}

/// What `CheckOnline` answers: per user, whether online and when last
/// seen (Unix ms); per guest, whether online. In request order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Statuses {
    pub users: Vec<(bool, Option<u64>)>,
    pub guests: Vec<bool>,
}

/// A room and how many are online in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomCount {
    pub room: String,
    pub counts: Counts,
}

/// The order of `ListRooms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoomOrder {
    Name,
    MostOnline,
}

/// One page of rooms, and where the next one starts (`None`: done).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomsPage {
    pub rooms: Vec<RoomCount>,
    pub next: Option<RoomsPageToken>,
}

/// Merges two sorted lists of distinct names into the first `limit`, sorted.
///
/// Both stores keep *current* and *old* disjoint and each sorted, so who is
/// online is their merge, never needing a dedup or a full sort.
pub fn merge_sorted(a: Vec<String>, b: Vec<String>, limit: usize) -> Vec<String> {
    let mut merged = Vec::with_capacity((a.len() + b.len()).min(limit));
    let mut a = a.into_iter().peekable();
    let mut b = b.into_iter().peekable();
    while merged.len() < limit {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.as_bytes() <= y.as_bytes() => a.next(),
            (Some(_), Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => None,
        };
        match next {
            Some(name) => merged.push(name),
            None => break,
        }
    }
    merged
}

/// A page from the two sets' first `size` names after the cursor: the
/// merged first `size`, and whether nothing is left beyond them. Nothing is
/// left if neither set had more than it returned, and the merge kept all.
pub fn page_of(current: Vec<String>, old: Vec<String>, size: usize, total: u64) -> KindPage {
    let exhausted = current.len() < size && old.len() < size;
    let available = current.len() + old.len();
    let names = merge_sorted(current, old, size);
    let done = exhausted && names.len() == available;
    KindPage { names, total, done }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merging_interleaves_two_sorted_lists_in_byte_order() {
        let merged = merge_sorted(names(&["a", "c", "é"]), names(&["B", "b", "d"]), usize::MAX);
        assert_eq!(merged, names(&["B", "a", "b", "c", "d", "é"]));
    }

    #[test]
    fn merging_stops_at_the_limit() {
        let merged = merge_sorted(names(&["a", "c"]), names(&["b", "d"]), 3);
        assert_eq!(merged, names(&["a", "b", "c"]));
    }

    #[test]
    fn merging_with_an_empty_side_returns_the_other() {
        assert_eq!(merge_sorted(vec![], names(&["x"]), 10), names(&["x"]));
        assert_eq!(merge_sorted(names(&["x"]), vec![], 10), names(&["x"]));
    }

    #[test]
    fn a_page_is_done_only_when_both_sets_are_exhausted_and_all_was_kept() {
        assert!(page_of(names(&["a"]), names(&["b"]), 3, 2).done);
        assert!(!page_of(names(&["a", "c"]), names(&["b"]), 2, 3).done, "c is left");
        assert!(!page_of(names(&["a", "b"]), vec![], 2, 5).done, "current may hold more");
        assert!(page_of(vec![], vec![], 2, 0).done);
    }
}
