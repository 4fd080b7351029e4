//! Values that exist past the gRPC edge. Each is parsed once from what a
//! client sent; code that holds one knows it is valid.

mod guest_address;
mod username;

pub use guest_address::{GuestAddress, GuestAddressError};
pub use username::{Username, UsernameError};

/// Everyone one report names: signed-in users and guests, already valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Visitors {
    pub users: Vec<Username>,
    pub guests: Vec<GuestAddress>,
}

impl Visitors {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.guests.is_empty()
    }
}

/// Who is online: the first names of each kind, and the exact totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Online {
    pub users: OnlineList,
    pub guests: OnlineList,
}

/// One kind's part of [`Online`]: `names` is sorted ascending by bytes and
/// holds at most the requested limit; `total` counts all, whatever the limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnlineList {
    pub names: Vec<String>,
    pub total: u64,
}

/// How many names of each kind a listing returns at most. `None` is all.
pub type ListLimit = Option<std::num::NonZeroUsize>;
