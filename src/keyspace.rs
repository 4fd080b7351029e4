//! The Redis key layout and every server-side script: the one place that
//! names a key. Operators rely on these exact strings (to inspect, to
//! migrate, to give each environment its own prefix), so they are a contract
//! and the tests below pin them down.
//!
//! For each kind of visitor (`users`, `guests`) and a prefix `P`
//! (`presence` by default) there are three keys:
//!
//! | key                          | type       | holds                                               |
//! |------------------------------|------------|-----------------------------------------------------|
//! | `{P:users}:current`          | sorted set | names seen since the last rotation                  |
//! | `{P:users}:old`              | sorted set | names seen in the interval before, and not since    |
//! | `{P:users}:rotation-lease`   | string     | who rotated last; expires one interval after it did |
//!
//! Why these choices:
//! - **Hash tags.** The `{P:kind}` part is the Redis Cluster hash tag, so all
//!   keys of one kind live in one slot and each script below touches one slot:
//!   the same code runs on a single Redis and on a cluster.
//! - **Sorted sets with score 0.** Members of equal score are ordered by their
//!   bytes, so a sorted, limited listing is `ZRANGE 0 limit-1`, not a full
//!   `SUNION` plus a sort.
//! - **Disjoint sets.** A report adds the name to *current* and removes it from
//!   *old* in one atomic step. The union's size is then the sum of two
//!   `ZCARD`s, exact and O(1), and a listing never sees a name twice.
//! - **Rotation under a lease.** The rotation takes the lease key with
//!   `SET NX PX interval` in the same script that rotates. However many
//!   replicas call it, the sets rotate at most once per interval; a replica
//!   that loses the race learns from the lease's TTL when to try again.
//! - **UNLINK, then RENAME.** The old set is freed by `UNLINK`, in the
//!   background, so rotating a million names does not stall Redis; `RENAME`
//!   then moves *current* onto a key that no longer exists, which frees nothing.

use std::fmt;

/// The two kinds of visitors, each with its own pair of sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Users,
    Guests,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Users, Kind::Guests];

    /// The kind's name in keys, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Users => "users",
            Kind::Guests => "guests",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first part of every key, so several deployments can share one Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyPrefixError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {} bytes", KeyPrefix::MAX_BYTES)]
    TooLong,
    #[error("may hold only letters, digits and `:_.-` (braces would break the cluster hash tag)")]
    BadCharacter,
}

impl KeyPrefix {
    pub const MAX_BYTES: usize = 128;

    pub fn parse(text: &str) -> Result<Self, KeyPrefixError> {
        if text.is_empty() {
            return Err(KeyPrefixError::Empty);
        }
        if text.len() > Self::MAX_BYTES {
            return Err(KeyPrefixError::TooLong);
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || ":_.-".contains(c);
        if !text.chars().all(allowed) {
            return Err(KeyPrefixError::BadCharacter);
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self("presence".to_owned())
    }
}

impl std::str::FromStr for KeyPrefix {
    type Err = KeyPrefixError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// The keys of one kind. All share one hash tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindKeys {
    pub current: String,
    pub old: String,
    pub rotation_lease: String,
}

impl KindKeys {
    pub fn new(prefix: &KeyPrefix, kind: Kind) -> Self {
        let tag = format!("{{{}:{}}}", prefix.as_str(), kind.as_str());
        Self {
            current: format!("{tag}:current"),
            old: format!("{tag}:old"),
            rotation_lease: format!("{tag}:rotation-lease"),
        }
    }
}

/// Every key the service uses, built once from the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    users: KindKeys,
    guests: KindKeys,
}

impl Keyspace {
    pub fn new(prefix: &KeyPrefix) -> Self {
        Self {
            users: KindKeys::new(prefix, Kind::Users),
            guests: KindKeys::new(prefix, Kind::Guests),
        }
    }

    pub fn of(&self, kind: Kind) -> &KindKeys {
        match kind {
            Kind::Users => &self.users,
            Kind::Guests => &self.guests,
        }
    }
}

/// Reports names: adds each to *current* and removes it from *old*, in one
/// atomic step so that a rotation cannot fall between the two and lose it.
///
/// `KEYS`: current, old. `ARGV`: the names (at least one).
pub const REPORT_SCRIPT: &str = r#"
local members = {}
for i, name in ipairs(ARGV) do
  members[2 * i - 1] = 0
  members[2 * i] = name
end
redis.call('ZADD', KEYS[1], unpack(members))
redis.call('ZREM', KEYS[2], unpack(ARGV))
return 1
"#;

/// Lists one kind: the exact total and the first `limit` names of each set,
/// read atomically so a rotation cannot fall between them. The caller merges
/// the two sorted, disjoint lists and keeps the first `limit`.
///
/// `KEYS`: current, old. `ARGV`: limit (0 is no limit).
/// Returns `{total, current_names, old_names}`.
pub const LIST_SCRIPT: &str = r#"
local stop = tonumber(ARGV[1]) - 1
return {
  redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]),
  redis.call('ZRANGE', KEYS[1], 0, stop),
  redis.call('ZRANGE', KEYS[2], 0, stop),
}
"#;

/// Rotates one kind if no replica has in the last interval: takes the lease,
/// frees *old* in the background, and makes *current* the new *old* (if
/// *current* does not exist, *old* is simply gone).
///
/// `KEYS`: current, old, rotation lease. `ARGV`: interval in milliseconds,
/// the caller's name (kept in the lease for operators to see).
/// Returns `{1, interval}` if it rotated, else `{0, ms until the lease ends}`.
/// A lease found without an expiry is given one, so it cannot block the
/// rotation forever.
pub const ROTATE_SCRIPT: &str = r#"
local interval = tonumber(ARGV[1])
if not redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', interval) then
  local remaining = redis.call('PTTL', KEYS[3])
  if remaining < 0 then
    -- A lease without an expiry (set by hand?) would stop the rotation
    -- for good: give it one.
    redis.call('PEXPIRE', KEYS[3], interval)
    remaining = interval
  end
  return {0, remaining}
end
redis.call('UNLINK', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[2])
end
return {1, interval}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_layout_is_exactly_as_documented() {
        let keys = Keyspace::new(&KeyPrefix::default());
        assert_eq!(
            keys.of(Kind::Users),
            &KindKeys {
                current: "{presence:users}:current".into(),
                old: "{presence:users}:old".into(),
                rotation_lease: "{presence:users}:rotation-lease".into(),
            }
        );
        assert_eq!(
            keys.of(Kind::Guests),
            &KindKeys {
                current: "{presence:guests}:current".into(),
                old: "{presence:guests}:old".into(),
                rotation_lease: "{presence:guests}:rotation-lease".into(),
            }
        );
    }

    #[test]
    fn the_prefix_goes_inside_the_hash_tag() {
        let prefix = KeyPrefix::parse("staging:eu-1").expect("a valid prefix");
        let keys = Keyspace::new(&prefix);
        assert_eq!(keys.of(Kind::Users).current, "{staging:eu-1:users}:current");
    }

    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').expect("a hash tag opens");
        let close = key[open..].find('}').expect("a hash tag closes") + open;
        &key[open + 1..close]
    }

    #[test]
    fn all_keys_of_one_kind_share_one_hash_tag_and_kinds_differ() {
        let keys = Keyspace::new(&KeyPrefix::default());
        for kind in Kind::ALL {
            let k = keys.of(kind);
            assert_eq!(hash_tag(&k.current), hash_tag(&k.old));
            assert_eq!(hash_tag(&k.current), hash_tag(&k.rotation_lease));
        }
        assert_ne!(
            hash_tag(&keys.of(Kind::Users).current),
            hash_tag(&keys.of(Kind::Guests).current)
        );
    }

    #[test]
    fn a_prefix_with_braces_or_spaces_is_rejected() {
        for bad in ["a{b", "a}b", "a b", "ä", "a\n"] {
            assert_eq!(KeyPrefix::parse(bad), Err(KeyPrefixError::BadCharacter), "{bad:?}");
        }
        assert_eq!(KeyPrefix::parse(""), Err(KeyPrefixError::Empty));
        assert_eq!(KeyPrefix::parse(&"a".repeat(129)), Err(KeyPrefixError::TooLong));
    }

    #[test]
    fn the_rotation_frees_old_with_unlink_and_never_a_blocking_delete() {
        assert!(ROTATE_SCRIPT.contains("'UNLINK', KEYS[2]"));
        assert!(!ROTATE_SCRIPT.contains("'DEL'"));
        let unlink = ROTATE_SCRIPT.find("UNLINK").unwrap_or(usize::MAX);
        let rename = ROTATE_SCRIPT.find("RENAME").unwrap_or(0);
        assert!(unlink < rename, "old must be gone before RENAME overwrites it");
    }

    #[test]
    fn the_rotation_takes_its_lease_atomically_with_nx_and_an_expiry() {
        assert!(ROTATE_SCRIPT.contains("'SET', KEYS[3], ARGV[2], 'NX', 'PX', interval"));
    }
}
