//! The Redis key layout and every server-side script: the one place that
//! names a key. Operators rely on these exact strings (to inspect, to
//! migrate, to give each environment its own prefix), so they are a contract
//! and the tests below pin them down.
//!
//! For a prefix `P` (`presence` by default) and each kind `K` (`users`,
//! `guests`), site-wide:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{P:K}:current` | sorted set, scores 0 | names seen in this interval |
//! | `{P:K}:old` | sorted set, scores 0 | names seen in the interval before, and not since |
//! | `{P:K}:interval` | string | start (Unix ms, Redis's clock) of the interval *current* belongs to |
//! | `{P:K}:memberships:current`, `:old` | sorted sets, scores 0 | `name\0room` for each room a name was seen in, per interval |
//! | `{P:users}:last-seen` | sorted set, score = Unix ms | when each user was last reported (while last seen is on) |
//! | `{P:users}:replicas` | sorted set, score = Unix ms | replicas whose repeat filter may skip reports, until when |
//! | `{P:K}:leaving`, `:seq`, `:watched` | sorted set, integer, string | change streams, while someone watches |
//!
//! For each room `R` (`%`, `{` and `}` percent-encoded as `E`):
//! `{P:room:E}:K:current`, `:K:old`, `:K:interval`, `:K:leaving`, `:K:seq`,
//! `{P:room:E}:version` and `{P:room:E}:watched`, all expiring on their own
//! a little after two intervals without a report. And the rooms index:
//! `{P:rooms}:names` (rooms by name), `{P:rooms}:users` (scored by minus
//! the users online, so busiest first is ascending), `{P:rooms}:indexed` (the
//! version of each room's counts there), `{P:rooms}:seen:START` (the rooms
//! reported into during the interval that starts at START, for the sweep)
//! and `{P:rooms}:sweep` (which replica sweeps the rooms this interval).
//! Builds before the index kept versions in a sorted set wrote
//! `{P:rooms}:versions` and `{P:rooms}:guests`; nothing reads them now, and
//! the replica that takes each interval's sweep removes them.
//!
//! Pub/sub channels (sharded in a cluster, `SSUBSCRIBE`/`SPUBLISH`, so each
//! message stays on the node of its slot; plain elsewhere):
//! `{P:K}:changes` and `{P:room:E}:changes` carry joins and leaves;
//! `{P:users}:filter` and `{P:users}:filter:ID` carry the repeat filter's
//! invalidations, pings and acknowledgements.
//!
//! Why these choices:
//! - **Hash tags.** Each scope's keys share a Redis Cluster hash tag, so every
//!   script touches one slot and the same code runs on one Redis and on a
//!   cluster; each room has its own tag, so rooms spread over the masters.
//! - **Sorted sets with score 0.** Members of equal score are ordered by their
//!   bytes, so a page is `ZRANGE (after + BYLEX LIMIT 0 n`: paging by name
//!   is O(log N + n) whatever the number online.
//! - **Disjoint sets.** A report adds a name to *current* and removes it from
//!   *old* in one atomic step. The union's size is the sum of two `ZCARD`s,
//!   exact and O(1), and a listing never sees a name twice.
//! - **Intervals on Redis's clock.** Interval `k` runs from `k * T` to
//!   `(k + 1) * T` by Redis's own `TIME`. Every script that touches a scope
//!   first brings it into the current interval (rotating at most once), so
//!   answers never depend on a scheduler having run, rotations happen once
//!   per interval however many replicas there are, and a room nobody touches
//!   costs nothing.
//! - **UNLINK, then RENAME.** A set that leaves the lists is freed by
//!   `UNLINK`, in the background, so rotating a million names does not stall
//!   Redis; `RENAME` then moves *current* onto a key that no longer exists,
//!   which frees nothing. While someone watches, the leaving set is renamed to
//!   `leaving` instead and announced in small steps.

use std::fmt;

pub use crate::domain::Kind;
use crate::domain::{Room, Scope};

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

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The keys of one kind in one scope. All share the scope's hash tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindKeys {
    pub current: String,
    pub old: String,
    pub interval: String,
    pub leaving: String,
    pub seq: String,
    /// Shared by both kinds of a room; one per kind on the site.
    pub watched: String,
    /// The sharded channel that carries this kind's joins and leaves.
    pub changes: String,
}

/// The keys of one room: both kinds under one hash tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomKeys {
    pub users: KindKeys,
    pub guests: KindKeys,
    /// Bumped by every change of the room's counts, so the rooms index
    /// keeps the newest counts whatever order updates arrive in.
    pub version: String,
}

impl RoomKeys {
    pub fn of(&self, kind: Kind) -> &KindKeys {
        match kind {
            Kind::Users => &self.users,
            Kind::Guests => &self.guests,
        }
    }

    /// Every key the room may have, for removing what is left of it.
    pub fn all(&self) -> [&str; 12] {
        let (u, g) = (&self.users, &self.guests);
        [
            &u.current,
            &u.old,
            &u.interval,
            &u.leaving,
            &u.seq,
            &g.current,
            &g.old,
            &g.interval,
            &g.leaving,
            &g.seq,
            &self.version,
            &u.watched,
        ]
    }
}

/// The site-wide keys of one kind, beyond its sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteKeys {
    pub kind: KindKeys,
    pub memberships_current: String,
    pub memberships_old: String,
}

impl KindKeys {
    /// The 7 keys a room's kind passes to a script, in the scripts' order.
    pub fn seven(&self) -> [&str; 7] {
        [
            &self.current,
            &self.old,
            &self.interval,
            &self.leaving,
            &self.seq,
            &self.watched,
            &self.changes,
        ]
    }
}

impl SiteKeys {
    /// The 9 keys a site kind passes to a script: its 7, and its memberships.
    pub fn nine(&self) -> [&str; 9] {
        let [a, b, c, d, e, f, g] = self.kind.seven();
        [a, b, c, d, e, f, g, &self.memberships_current, &self.memberships_old]
    }
}

/// The index of rooms, in a slot of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomsIndexKeys {
    pub names: String,
    pub users: String,
    /// Sorted set: the version of each room's counts in the index, so that
    /// an older update arriving late is ignored.
    pub indexed: String,
    seen: String,
    pub sweep: String,
    /// Keys of the index that earlier builds wrote and nothing reads any
    /// more (`:versions`, `:guests`): removed once per interval by the
    /// replica that takes the sweep, so an upgrade leaves nothing behind.
    pub retired: [String; 2],
}

impl RoomsIndexKeys {
    /// The rooms reported into during the interval starting at `start`.
    pub fn seen(&self, start: u64) -> String {
        format!("{}:{start}", self.seen)
    }

    /// What every interval's seen set starts with: [`ROOM_REPORT_SCRIPT`]
    /// appends `:START` itself.
    pub fn seen_prefix(&self) -> &str {
        &self.seen
    }
}

/// The repeat filter's coordination, in the site users' slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterKeys {
    pub replicas: String,
    /// Every replica subscribes: invalidations after a `Leave`.
    pub broadcast: String,
}

impl FilterKeys {
    /// One replica's own channel: its pings come back on it, and the
    /// acknowledgements of its invalidations.
    pub fn direct(&self, replica: &str) -> String {
        format!("{}:{replica}", self.broadcast)
    }
}

/// Every key the service uses, built from the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    prefix: KeyPrefix,
    users: SiteKeys,
    guests: SiteKeys,
    pub last_seen: String,
    pub filter: FilterKeys,
    pub rooms: RoomsIndexKeys,
}

impl Keyspace {
    pub fn new(prefix: &KeyPrefix) -> Self {
        let site = |kind: Kind| {
            let tag = format!("{{{}:{}}}", prefix.as_str(), kind.as_str());
            SiteKeys {
                kind: kind_keys(&tag, "", &format!("{tag}:watched"), &format!("{tag}:changes")),
                memberships_current: format!("{tag}:memberships:current"),
                memberships_old: format!("{tag}:memberships:old"),
            }
        };
        let users_tag = format!("{{{}:users}}", prefix.as_str());
        let rooms_tag = format!("{{{}:rooms}}", prefix.as_str());
        Self {
            prefix: prefix.clone(),
            users: site(Kind::Users),
            guests: site(Kind::Guests),
            last_seen: format!("{users_tag}:last-seen"),
            filter: FilterKeys {
                replicas: format!("{users_tag}:replicas"),
                broadcast: format!("{users_tag}:filter"),
            },
            rooms: RoomsIndexKeys {
                names: format!("{rooms_tag}:names"),
                users: format!("{rooms_tag}:users"),
                indexed: format!("{rooms_tag}:indexed"),
                seen: format!("{rooms_tag}:seen"),
                sweep: format!("{rooms_tag}:sweep"),
                retired: [format!("{rooms_tag}:versions"), format!("{rooms_tag}:guests")],
            },
        }
    }

    pub fn site(&self, kind: Kind) -> &SiteKeys {
        match kind {
            Kind::Users => &self.users,
            Kind::Guests => &self.guests,
        }
    }

    pub fn room(&self, room: &Room) -> RoomKeys {
        let tag = format!("{{{}:room:{}}}", self.prefix.as_str(), escape(room.as_str()));
        let watched = format!("{tag}:watched");
        let changes = format!("{tag}:changes");
        RoomKeys {
            users: kind_keys(&tag, ":users", &watched, &changes),
            guests: kind_keys(&tag, ":guests", &watched, &changes),
            version: format!("{tag}:version"),
        }
    }

    /// The keys of one kind in a scope.
    pub fn kind_in(&self, scope: &Scope, kind: Kind) -> KindKeys {
        match scope {
            Scope::Site => self.site(kind).kind.clone(),
            Scope::Room(room) => self.room(room).of(kind).clone(),
        }
    }
}

fn kind_keys(tag: &str, kind: &str, watched: &str, changes: &str) -> KindKeys {
    KindKeys {
        current: format!("{tag}{kind}:current"),
        old: format!("{tag}{kind}:old"),
        interval: format!("{tag}{kind}:interval"),
        leaving: format!("{tag}{kind}:leaving"),
        seq: format!("{tag}{kind}:seq"),
        watched: watched.to_owned(),
        changes: changes.to_owned(),
    }
}

/// Percent-encodes what would break a hash tag (`{`, `}`) and the escape
/// itself, so each room's tag is its whole name and no two rooms share keys.
fn escape(room: &str) -> String {
    let mut escaped = String::with_capacity(room.len());
    for c in room.chars() {
        match c {
            '%' => escaped.push_str("%25"),
            '{' => escaped.push_str("%7B"),
            '}' => escaped.push_str("%7D"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// The separator between a name and a room in a membership, and between
/// fields of pub/sub messages: a control character, which no valid name or
/// room contains.
pub const MEMBERSHIP_SEPARATOR: char = '\0';
pub const MESSAGE_SEPARATOR: char = '\n';

/// Functions every script shares, prepended to each. Every script with the
/// prelude takes, before the arguments it lists, the command that publishes
/// on a channel: `SPUBLISH` (sharded, for a cluster: the message stays on
/// the node of the channel's slot) or `PUBLISH`.
macro_rules! prelude {
    () => {
        r#"
local PUBLISH = table.remove(ARGV, 1)

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Redis's clock in µs.
local function clock_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The next version of a room's counts, which orders the rooms index's
-- updates. A room's first version is Redis's clock in µs, not 1: a room
-- whose keys all expired before a sweep got to it starts again above every
-- version the index still holds for it. Returns the version and whether
-- the key was made now (it then expires at `expires`).
local function next_version(key, expires)
  local version = redis.call('INCR', key)
  if version ~= 1 then
    return version, false
  end
  version = clock_us()
  redis.call('SET', key, string.format('%.0f', version), 'PXAT', expires)
  return version, true
end

-- Whether someone watches the kind's scope, read once per script: a
-- script never changes it after its first read.
local function watched(k)
  if k.watching == nil then
    k.watching = redis.call('EXISTS', k.watched) == 1
  end
  return k.watching
end

-- Reads the interval keys of kinds and their (shared) watched key in one
-- call, for `catch_up` and `watched`: a room's report would otherwise spend
-- three calls on them.
local function prefetch(kinds)
  local keys = {}
  for i, k in ipairs(kinds) do
    keys[i] = k.interval
  end
  keys[#keys + 1] = kinds[1].watched
  local got = redis.call('MGET', unpack(keys))
  for i, k in ipairs(kinds) do
    k.since = got[i]
    k.watching = got[#got] ~= false
  end
end

-- Drops a set that leaves the lists. While someone watches, its names move
-- to `leaving`, to be announced in small steps; names still there from an
-- earlier rotation are dropped unannounced, and a jump in `seq` tells the
-- watchers to resync. Otherwise the set is UNLINKed: freed in the
-- background, so that a big set never stalls Redis.
local function retire(set, leaving, seq, watching, keep_until)
  if redis.call('EXISTS', leaving) == 1 then
    redis.call('UNLINK', leaving)
    redis.call('INCR', seq)
  end
  if redis.call('EXISTS', set) == 0 then
    return
  end
  if watching then
    redis.call('RENAME', set, leaving)
    if keep_until > 0 then
      redis.call('PEXPIREAT', leaving, keep_until)
    end
  else
    redis.call('UNLINK', set)
  end
end

-- Brings one kind of one scope into the interval `now` falls in: after one
-- interval, `old` leaves and `current` becomes `old`; after two or more, both
-- leave. `k` holds the kind's keys; `keep` (ms, 0 for none) is how long
-- after the interval's start its keys may live without another report.
-- Returns the interval's start, 1 if this call rotated, and the interval
-- key's state: 0 absent (nothing here), 1 already current, 2 written now.
-- The interval key may have been read already (`prefetch`).
local function catch_up(k, period, now, keep)
  local start = now - (now % period)
  local raw = k.since
  if raw == nil then
    raw = redis.call('GET', k.interval)
  end
  -- Read once: this call may move the interval on.
  k.since = nil
  local since = tonumber(raw)
  if since ~= nil and since >= start then
    return since, 0, 1
  end
  local rotated = 0
  if since ~= nil then
    local watching = watched(k)
    local keep_until = 0
    if keep > 0 then
      keep_until = start + keep
    end
    local one = since >= start - period
    retire(k.old, k.leaving, k.seq, watching, keep_until)
    if one then
      if redis.call('EXISTS', k.current) == 1 then
        redis.call('RENAME', k.current, k.old)
      end
    else
      retire(k.current, k.leaving, k.seq, watching, keep_until)
    end
    if k.memberships_current then
      -- A name's rooms follow the same intervals as the name.
      redis.call('UNLINK', k.memberships_old)
      if one and redis.call('EXISTS', k.memberships_current) == 1 then
        redis.call('RENAME', k.memberships_current, k.memberships_old)
      else
        redis.call('UNLINK', k.memberships_current)
      end
    end
    rotated = 1
  elseif keep > 0 or redis.call('EXISTS', k.current, k.old) == 0 then
    -- Nothing here: reading an empty scope must not create keys. A scope
    -- whose keys expire (`keep`) has none without its interval key: each
    -- key expires no later than the interval key written with it.
    return start, 0, 0
  end
  if keep > 0 then
    redis.call('SET', k.interval, start, 'PXAT', start + keep)
  else
    redis.call('SET', k.interval, start)
  end
  return start, rotated, 2
end

-- Announces names on the kind's channel, with the next sequence number.
local function announce(k, what, kind, names)
  if #names == 0 then
    return
  end
  local seq = redis.call('INCR', k.seq)
  redis.call(PUBLISH, k.changes, what .. '\n' .. kind .. '\n' .. seq .. '\n' .. table.concat(names, '\n'))
end

-- Adds names to `current` and takes them out of `old`. While someone
-- watches, it also finds which names are newly listed, and announces them.
-- Returns how many names were not in `current` before.
local function add(k, kind, names)
  if #names == 0 then
    return 0
  end
  if not watched(k) then
    local members = {}
    for i, name in ipairs(names) do
      members[2 * i - 1] = 0
      members[2 * i] = name
    end
    local added = redis.call('ZADD', k.current, unpack(members))
    redis.call('ZREM', k.old, unpack(names))
    return added
  end
  local joined = {}
  local added = 0
  for _, name in ipairs(names) do
    if not redis.call('ZSCORE', k.current, name) then
      -- Out of `leaving` too: back before its leave was announced, so
      -- it never left as far as watchers know.
      if redis.call('ZREM', k.old, name) == 0 and redis.call('ZREM', k.leaving, name) == 0 then
        joined[#joined + 1] = name
      end
      redis.call('ZADD', k.current, 0, name)
      added = added + 1
    end
  end
  announce(k, 'joined', kind, joined)
  return added
end

-- Takes names off the lists; announces those that were listed.
local function remove(k, kind, names)
  if #names == 0 then
    return
  end
  if not watched(k) then
    redis.call('ZREM', k.current, unpack(names))
    redis.call('ZREM', k.old, unpack(names))
  else
    local left = {}
    for _, name in ipairs(names) do
      local was = redis.call('ZREM', k.current, name) + redis.call('ZREM', k.old, name)
      if was > 0 then
        left[#left + 1] = name
      end
    end
    announce(k, 'left', kind, left)
  end
  redis.call('ZREM', k.leaving, unpack(names))
end

local function count(k)
  return redis.call('ZCARD', k.current) + redis.call('ZCARD', k.old)
end

-- A kind's keys from KEYS, from position `at`: 7 for a room's kind, 9 for
-- a site kind (with its memberships).
local function kind_at(keys, at, site)
  local k = {
    current = keys[at], old = keys[at + 1], interval = keys[at + 2], leaving = keys[at + 3],
    seq = keys[at + 4], watched = keys[at + 5], changes = keys[at + 6],
  }
  if site then
    k.memberships_current = keys[at + 7]
    k.memberships_old = keys[at + 8]
  end
  return k
end

-- A room script's common start: both kinds' keys (KEYS: users' 7, guests'
-- 7, version), brought into the current interval, and the names of ARGV
-- (interval ms, keep ms, number of users, the users, the guests). Also
-- returns each kind's interval key state (see `catch_up`).
local function room_args()
  local users = kind_at(KEYS, 1, false)
  local guests = kind_at(KEYS, 8, false)
  local period, keep, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
  local now = now_ms()
  prefetch({users, guests})
  local start, _, users_state = catch_up(users, period, now, keep)
  local _, _, guests_state = catch_up(guests, period, now, keep)
  local user_names, guest_names = {}, {}
  for i = 4, 3 + n do
    user_names[#user_names + 1] = ARGV[i]
  end
  for i = 4 + n, #ARGV do
    guest_names[#guest_names + 1] = ARGV[i]
  end
  return users, guests, start, keep, user_names, guest_names, {users_state, guests_state}
end
"#
    };
}

/// The rooms index's update of one room, shared by the index script and
/// (off a cluster) the room report script: the room's counts go in only if
/// their version is newer than the one indexed (updates from many replicas
/// may arrive out of order): `ZADD GT CH` on `indexed` both compares and
/// records it, in one call. A room with nobody online leaves the index.
/// `ListRooms` reads each listed room's counts afresh, so the index keeps
/// only what orders the rooms: names, and users online. `index` holds the
/// keys names, users, indexed.
macro_rules! index_room {
    () => {
        r#"
local function index_room(index, room, users, guests, version)
  if redis.call('ZADD', index.indexed, 'GT', 'CH', version, room) == 0 then
    return
  end
  if users == 0 and guests == 0 then
    redis.call('ZREM', index.names, room)
    redis.call('ZREM', index.users, room)
    redis.call('ZREM', index.indexed, room)
  elseif redis.call('ZADD', index.users, -users, room) == 1 then
    -- Minus the count: ascending order is busiest first, ties by name.
    -- New in the index: it enters (and leaves) all three keys at once.
    redis.call('ZADD', index.names, 0, room)
  end
end
"#
    };
}

/// Reports names site-wide, for one kind: brings the kind into the current
/// interval, adds the names, records each name's room (`""` for none) as a
/// membership, and the users' last seen.
///
/// `KEYS`: the kind's 9 keys (current, old, interval, leaving, seq, watched,
/// changes, memberships current, memberships old), last seen.
/// `ARGV`: interval ms, kind, record last seen (0/1), n, n names, n rooms.
/// Returns `{interval start, rotated}`.
pub const SITE_REPORT_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local k = kind_at(KEYS, 1, true)
local period = tonumber(ARGV[1])
local kind = ARGV[2]
local n = tonumber(ARGV[4])
local now = now_ms()
local start, rotated = catch_up(k, period, now, 0)
local names = {}
local memberships = {}
for i = 1, n do
  local name = ARGV[4 + i]
  names[i] = name
  local room = ARGV[4 + n + i]
  if room ~= '' then
    memberships[#memberships + 1] = name .. '\0' .. room
  end
end
add(k, kind, names)
if #memberships > 0 then
  local members = {}
  for i, m in ipairs(memberships) do
    members[2 * i - 1] = 0
    members[2 * i] = m
  end
  redis.call('ZADD', k.memberships_current, unpack(members))
  redis.call('ZREM', k.memberships_old, unpack(memberships))
end
if ARGV[3] == '1' then
  local seen = {}
  for i, name in ipairs(names) do
    seen[2 * i - 1] = now
    seen[2 * i] = name
  end
  redis.call('ZADD', KEYS[10], unpack(seen))
end
if redis.call('EXISTS', k.interval) == 0 then
  redis.call('SET', k.interval, start)
end
return {start, rotated}
"#
);

/// Reports names into one room, both kinds at once (they share the room's
/// slot). Room keys expire on their own `keep` ms after the interval's
/// start, so a room nobody reports into leaves nothing behind. Every key's
/// expiry is set when the key is made, not again on each report: this
/// script runs for every visit to a room, and each Redis call it makes
/// costs about 1.5 µs inside Redis.
///
/// Off a cluster, where one script may touch keys of any slot, it also
/// updates the rooms index and notes the room in the interval's seen set:
/// one script call per room instead of two, with nothing to wait for in
/// between. In a cluster the index is in a slot of its own, and the caller
/// updates it with [`INDEX_ROOMS_SCRIPT`] from the counts returned.
///
/// `KEYS`: users' 7 keys, guests' 7 keys, version; off a cluster, then the
/// index's names, users, indexed, and the seen sets' common start (the
/// interval's start is appended: the one key not named in full, as only
/// the script knows the interval).
/// `ARGV`: interval ms, keep ms, number of users, the users, the guests;
/// off a cluster, then the room and how long (ms) a seen set lives from
/// its interval's start.
/// Returns `{interval start, users online, guests online, version}`.
pub const ROOM_REPORT_SCRIPT: &str = concat!(
    prelude!(),
    index_room!(),
    r#"
local indexed = #KEYS > 15
local room, seen_for
if indexed then
  seen_for = tonumber(table.remove(ARGV))
  room = table.remove(ARGV)
end
local users, guests, start, keep, user_names, guest_names, states = room_args()
local expires = start + keep
local kinds = {{users, 'users', user_names}, {guests, 'guests', guest_names}}
local counts = {}
-- The version must outlive every key of the room: it is renewed whenever
-- one is made or moved on.
local renew = states[1] == 2 or states[2] == 2
for i, kind in ipairs(kinds) do
  local k = kind[1]
  local added = add(k, kind[2], kind[3])
  -- A kind with no keys and no names here (guests, in most rooms) has
  -- nothing to count.
  local current = 0
  if states[i] ~= 0 or added > 0 then
    current = redis.call('ZCARD', k.current)
  end
  if added > 0 and added == current then
    -- `current` was made just now.
    redis.call('PEXPIREAT', k.current, expires)
    renew = true
  end
  if states[i] == 0 and current > 0 then
    redis.call('SET', k.interval, start, 'PXAT', expires)
    renew = true
  end
  counts[i] = current
  if states[i] ~= 0 then
    counts[i] = current + redis.call('ZCARD', k.old)
  end
end
local version, fresh = next_version(KEYS[15], expires)
if renew and not fresh then
  redis.call('PEXPIREAT', KEYS[15], expires)
end
if indexed then
  index_room({names = KEYS[16], users = KEYS[17], indexed = KEYS[18]}, room, counts[1], counts[2], version)
  local seen = KEYS[19] .. ':' .. start
  if redis.call('ZADD', seen, 0, room) == 1 then
    redis.call('PEXPIREAT', seen, start + seen_for)
  end
end
return {start, counts[1], counts[2], version}
"#
);

/// Takes names off the site's lists for one kind, and finds the rooms each
/// was in (from the memberships), removing those memberships too.
///
/// `KEYS`: the kind's 9 keys. `ARGV`: interval ms, kind, names.
/// Returns `{rotated, {for each name, the list of its rooms}}`.
pub const SITE_LEAVE_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local k = kind_at(KEYS, 1, true)
local _, rotated = catch_up(k, tonumber(ARGV[1]), now_ms(), 0)
local names = {}
local rooms = {}
for i = 3, #ARGV do
  local name = ARGV[i]
  names[#names + 1] = name
  local found = {}
  for _, set in ipairs({k.memberships_current, k.memberships_old}) do
    local members = redis.call('ZRANGE', set, '[' .. name .. '\0', '[' .. name .. '\1', 'BYLEX')
    for _, m in ipairs(members) do
      found[#found + 1] = string.sub(m, #name + 2)
    end
    if #members > 0 then
      redis.call('ZREM', set, unpack(members))
    end
  end
  rooms[#rooms + 1] = found
end
remove(k, ARGV[2], names)
return {rotated, rooms}
"#
);

/// Removes the memberships of names in one room (a `Leave` in that room).
///
/// `KEYS`: memberships current, memberships old. `ARGV`: room, names.
pub const FORGET_MEMBERSHIPS_SCRIPT: &str = r#"
local members = {}
for i = 2, #ARGV do
  members[#members + 1] = ARGV[i] .. '\0' .. ARGV[1]
end
redis.call('ZREM', KEYS[1], unpack(members))
redis.call('ZREM', KEYS[2], unpack(members))
return 1
"#;

/// Takes names off one room's lists, both kinds.
///
/// `KEYS`: users' 7 keys, guests' 7 keys, version.
/// `ARGV`: interval ms, keep ms, number of users, the users, the guests.
/// Returns `{interval start, users online, guests online, version}`.
pub const ROOM_LEAVE_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local users, guests, start, keep, user_names, guest_names = room_args()
remove(users, 'users', user_names)
remove(guests, 'guests', guest_names)
local version = next_version(KEYS[15], start + keep)
return {start, count(users), count(guests), version}
"#
);

/// One page of one kind in one scope, or of each of two kinds: the exact
/// total, and up to `n` names after `after` (exclusive; `""` from the
/// start) from each set. The caller merges the two sorted, disjoint lists
/// and keeps the first `n`. With `n = 0` it is a count. Each kind reads at
/// most `2n` names, so a page holds Redis for the same short time whatever
/// the number online. Both kinds at once take one round trip instead of
/// two, where their keys share a slot (a room's do; the site's only off a
/// cluster).
///
/// `KEYS`: each kind's 9 (site) or 7 (room) keys.
/// `ARGV`: interval ms, keep ms, then after and n for each kind.
/// Returns `{rotated, total, current names, old names}` for each kind.
pub const PAGE_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local per = 7
if #KEYS % 9 == 0 then
  per = 9
end
local period, keep, now = tonumber(ARGV[1]), tonumber(ARGV[2]), now_ms()
local out = {}
for i = 0, #KEYS / per - 1 do
  local k = kind_at(KEYS, 1 + i * per, per == 9)
  local _, rotated = catch_up(k, period, now, keep)
  local after, n = ARGV[3 + 2 * i], tonumber(ARGV[4 + 2 * i])
  out[#out + 1] = rotated
  out[#out + 1] = count(k)
  if n == 0 then
    out[#out + 1] = {}
    out[#out + 1] = {}
  else
    local min = '-'
    if after ~= '' then
      min = '(' .. after
    end
    out[#out + 1] = redis.call('ZRANGE', k.current, min, '+', 'BYLEX', 'LIMIT', 0, n)
    out[#out + 1] = redis.call('ZRANGE', k.old, min, '+', 'BYLEX', 'LIMIT', 0, n)
  end
end
return out
"#
);

/// Whether each name is online (in `current` or `old`) in one scope.
///
/// `KEYS`: the kind's 9 (site) or 7 (room) keys.
/// `ARGV`: interval ms, keep ms, names.
/// Returns `{rotated, {0/1 per name, in order}, Redis's clock in ms}`.
///
/// Users' last seen is read beside this script with a plain `ZMSCORE` of
/// `{P:users}:last-seen`, its retention counted back from the clock this
/// script returns. Not in a script: the scores are Unix ms, and a script
/// turned each into a Lua number and back into a string, which made the
/// read cost Redis about twice a plain `ZMSCORE` (BENCHMARKS.md, sixth
/// pass).
pub const CHECK_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local k = kind_at(KEYS, 1, #KEYS == 9)
local now = now_ms()
local _, rotated = catch_up(k, tonumber(ARGV[1]), now, tonumber(ARGV[2]))
local names = {}
for i = 3, #ARGV do
  names[#names + 1] = ARGV[i]
end
-- `old` is asked only about the names not in `current`: a page's names
-- are mostly one or the other, and each lookup in a big set is a cache miss.
local current = redis.call('ZMSCORE', k.current, unpack(names))
local online, missing, at = {}, {}, {}
for i = 1, #names do
  if current[i] then
    online[i] = 1
  else
    online[i] = 0
    missing[#missing + 1] = names[i]
    at[#at + 1] = i
  end
end
if #missing > 0 then
  local old = redis.call('ZMSCORE', k.old, unpack(missing))
  for j = 1, #missing do
    if old[j] then
      online[at[j]] = 1
    end
  end
end
return {rotated, online, now}
"#
);

/// Removes up to `n` last-seen entries older than the retention: called in
/// small steps, so that pruning a million stale entries never holds Redis
/// for long. Returns how many it removed.
///
/// `KEYS`: last seen. `ARGV`: retention ms, n.
pub const PRUNE_LAST_SEEN_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local cutoff = now_ms() - tonumber(ARGV[1])
local stale = redis.call('ZRANGE', KEYS[1], '-inf', '(' .. cutoff, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
if #stale > 0 then
  redis.call('ZREM', KEYS[1], unpack(stale))
end
return #stale
"#
);

/// The health probe of one site kind, once a second per replica: brings the
/// kind into the current interval (so rotations happen on time even with no
/// traffic), proves that Redis takes writes, and answers the count, Redis's
/// clock, and whether a name this replica wrote lately is still there (if
/// not, keys vanished without an error: a flush, an eviction, a failover
/// that lost writes).
///
/// `KEYS`: the kind's 9 keys. `ARGV`: interval ms, a name to look for (`""`
/// for none).
/// Returns `{now ms, interval start, rotated, total, sample present (0/1)}`.
pub const PROBE_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local k = kind_at(KEYS, 1, true)
local now = now_ms()
local start, rotated = catch_up(k, tonumber(ARGV[1]), now, 0)
-- A write every time, so that a read-only replica or a full Redis
-- (maxmemory with noeviction) shows as not ready.
redis.call('SET', k.interval, start)
local present = 1
if ARGV[2] ~= '' and not redis.call('ZSCORE', k.current, ARGV[2]) then
  present = 0
end
return {now, start, rotated, count(k), present}
"#
);

/// A replica's ping: it registers as one whose repeat filter may skip
/// reports until `now + lease`, and sends itself a ping on its own channel.
/// When the ping comes back, every invalidation sent before it has been
/// received (a subscriber gets messages in order), so the replica may skip
/// reports for a while; see `store/repeat_filter.rs`.
///
/// `KEYS`: replicas registry, the replica's own channel.
/// `ARGV`: replica id, lease ms, ping number.
/// Returns Redis's clock in ms.
pub const PING_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call(PUBLISH, KEYS[2], 'ping\n' .. ARGV[3])
return now
"#
);

/// Tells every replica to forget names (after a `Leave`), and answers which
/// replicas must acknowledge: those registered as possibly skipping, with
/// the end of their registration.
///
/// `KEYS`: replicas registry, the broadcast channel. `ARGV`: the message.
/// Returns `{now ms, {replica, until ms, ...}}`.
pub const INVALIDATE_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local now = now_ms()
local live = redis.call('ZRANGE', KEYS[1], '(' .. now, '+inf', 'BYSCORE', 'WITHSCORES')
redis.call(PUBLISH, KEYS[2], ARGV[1])
return {now, live}
"#
);

/// What a new watcher sees first: the count and the first `n` names of one
/// kind in one scope, with the sequence number of the last change it
/// includes, so that changes already in it are not applied twice.
///
/// `KEYS`: the kind's 9 (site) or 7 (room) keys. `ARGV`: interval ms, keep
/// ms, n. Returns `{rotated, seq, total, current names, old names}`.
pub const SNAPSHOT_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local k = kind_at(KEYS, 1, #KEYS == 9)
local _, rotated = catch_up(k, tonumber(ARGV[1]), now_ms(), tonumber(ARGV[2]))
local n = tonumber(ARGV[3])
local seq = tonumber(redis.call('GET', k.seq)) or 0
return {
  rotated, seq, count(k),
  redis.call('ZRANGE', k.current, '-', '+', 'BYLEX', 'LIMIT', 0, n),
  redis.call('ZRANGE', k.old, '-', '+', 'BYLEX', 'LIMIT', 0, n),
}
"#
);

/// Marks one kind of a scope as watched for `ttl` ms, and brings it into the
/// current interval: a replica with watchers calls it every second, so the
/// rotation of a watched scope is announced on time.
///
/// `KEYS`: the kind's 9 (site) or 7 (room) keys. `ARGV`: interval ms, keep
/// ms, ttl ms. Returns `{rotated, was watched}`: if the mark had lapsed,
/// changes went unannounced meanwhile, and watchers must resync.
pub const WATCH_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local k = kind_at(KEYS, 1, #KEYS == 9)
local was = redis.call('EXISTS', k.watched)
redis.call('SET', k.watched, '1', 'PX', tonumber(ARGV[3]))
local _, rotated = catch_up(k, tonumber(ARGV[1]), now_ms(), tonumber(ARGV[2]))
return {rotated, was}
"#
);

/// Announces up to `n` names that left at the last rotation, and forgets
/// them: one small step of announcing a big rotation. Any replica may call
/// it; each name is announced once. Returns how many it announced.
///
/// `KEYS`: the kind's 9 (site) or 7 (room) keys. `ARGV`: kind, n.
pub const DRAIN_LEAVING_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local k = kind_at(KEYS, 1, #KEYS == 9)
local names = redis.call('ZRANGE', k.leaving, 0, tonumber(ARGV[2]) - 1)
if #names == 0 then
  return 0
end
redis.call('ZREM', k.leaving, unpack(names))
announce(k, 'left', ARGV[1], names)
return #names
"#
);

/// One room's counts as of now: brings both kinds into the current interval
/// and, if nobody is online and nobody watches, removes what is left of the
/// room. Used by the sweep and by `ListRooms`.
///
/// `KEYS`: users' 7 keys, guests' 7 keys, version.
/// `ARGV`: interval ms, keep ms.
/// Returns `{users online, guests online, version}`.
pub const ROOM_COUNTS_SCRIPT: &str = concat!(
    prelude!(),
    r#"
local users = kind_at(KEYS, 1, false)
local guests = kind_at(KEYS, 8, false)
local period = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local now = now_ms()
local start, rotated = catch_up(users, period, now, keep)
local _, rotated_guests = catch_up(guests, period, now, keep)
local u, g = count(users), count(guests)
local version = tonumber(redis.call('GET', KEYS[15]))
if rotated == 1 or rotated_guests == 1 then
  local fresh
  version, fresh = next_version(KEYS[15], start + keep)
  if not fresh then
    redis.call('PEXPIREAT', KEYS[15], start + keep)
  end
elseif version == nil then
  -- No room here (its keys expired, or it never was), as of now: newer
  -- than whatever the index holds for it.
  version = clock_us()
end
if u == 0 and g == 0 and redis.call('EXISTS', users.watched) == 0
    and redis.call('EXISTS', users.leaving) == 0 and redis.call('EXISTS', guests.leaving) == 0 then
  -- Nobody left: nothing of the room may stay behind.
  redis.call('UNLINK', users.interval, guests.interval, users.seq, guests.seq, KEYS[15])
end
return {u, g, version}
"#
);

/// Updates the rooms index with rooms' counts (see `index_room!`). Rooms
/// reported into are noted in the set of their interval, for the sweep.
///
/// `KEYS`: names, users, indexed, seen set of the interval (for reports;
/// any key for the sweep). `ARGV`: expiry of the seen set (Unix ms, 0 not to
/// note), then groups of 4: room, users, guests, version.
pub const INDEX_ROOMS_SCRIPT: &str = concat!(
    index_room!(),
    r#"
local index = {names = KEYS[1], users = KEYS[2], indexed = KEYS[3]}
local note = tonumber(ARGV[1])
for i = 2, #ARGV, 4 do
  local room = ARGV[i]
  index_room(index, room, tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]))
  if note > 0 then
    redis.call('ZADD', KEYS[4], 0, room)
  end
end
if note > 0 then
  redis.call('PEXPIREAT', KEYS[4], note)
end
return 1
"#
);

/// One page of the rooms index: by name after a room, or busiest first from
/// a rank. The users index scores each room by minus its count, so that
/// Redis's ascending order is busiest first with ties in byte order of the
/// names. A page starts after the last room returned if it still has the
/// same count, else after every room that has more users.
///
/// `KEYS`: names, users. `ARGV`: order (`name`/`users`), after room (`""`
/// from the start), its users count, n. Returns the room names in order;
/// busiest first, each followed by its score (minus its count).
pub const ROOMS_PAGE_SCRIPT: &str = r#"
local n = tonumber(ARGV[4])
if ARGV[1] == 'name' then
  local min = '-'
  if ARGV[2] ~= '' then
    min = '(' .. ARGV[2]
  end
  return redis.call('ZRANGE', KEYS[1], min, '+', 'BYLEX', 'LIMIT', 0, n)
end
local from = 0
if ARGV[2] ~= '' then
  local score = -tonumber(ARGV[3])
  if tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2])) == score then
    from = redis.call('ZRANK', KEYS[2], ARGV[2]) + 1
  else
    from = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. score)
  end
end
return redis.call('ZRANGE', KEYS[2], from, from + n - 1, 'WITHSCORES')
"#;

/// Takes the sweep of the rooms for the interval starting at `start`, once
/// among all replicas. Returns 1 if this replica has it (now or already).
/// The taker also removes the index's retired keys (in the background:
/// `UNLINK`), which an earlier build still running in a rolling update may
/// have written again since the last interval.
///
/// `KEYS`: sweep, the retired keys. `ARGV`: interval start, replica.
pub const TAKE_SWEEP_SCRIPT: &str = r#"
local mine = ARGV[1] .. '/' .. ARGV[2]
local taken = redis.call('GET', KEYS[1])
if taken == mine then
  return 1
end
local start = tonumber(string.match(taken or '', '^(%d+)/')) or -1
if start >= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], mine)
redis.call('UNLINK', KEYS[2], KEYS[3])
return 1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> Room {
        match Scope::parse(name.to_owned()) {
            Ok(Scope::Room(room)) => room,
            other => panic!("not a room: {other:?}"),
        }
    }

    #[test]
    fn the_default_site_layout_is_exactly_as_documented() {
        let keys = Keyspace::new(&KeyPrefix::default());
        let users = keys.site(Kind::Users);
        assert_eq!(users.kind.current, "{presence:users}:current");
        assert_eq!(users.kind.old, "{presence:users}:old");
        assert_eq!(users.kind.interval, "{presence:users}:interval");
        assert_eq!(users.kind.leaving, "{presence:users}:leaving");
        assert_eq!(users.kind.seq, "{presence:users}:seq");
        assert_eq!(users.kind.watched, "{presence:users}:watched");
        assert_eq!(users.kind.changes, "{presence:users}:changes");
        assert_eq!(users.memberships_current, "{presence:users}:memberships:current");
        assert_eq!(users.memberships_old, "{presence:users}:memberships:old");
        assert_eq!(keys.site(Kind::Guests).kind.current, "{presence:guests}:current");
        assert_eq!(keys.last_seen, "{presence:users}:last-seen");
        assert_eq!(keys.filter.replicas, "{presence:users}:replicas");
        assert_eq!(keys.filter.broadcast, "{presence:users}:filter");
        assert_eq!(keys.filter.direct("r1"), "{presence:users}:filter:r1");
        assert_eq!(keys.rooms.names, "{presence:rooms}:names");
        assert_eq!(keys.rooms.users, "{presence:rooms}:users");
        assert_eq!(keys.rooms.seen(300_000), "{presence:rooms}:seen:300000");
        assert_eq!(keys.rooms.sweep, "{presence:rooms}:sweep");
        assert_eq!(
            keys.rooms.retired,
            ["{presence:rooms}:versions", "{presence:rooms}:guests"]
        );
    }

    #[test]
    fn a_room_has_its_own_hash_tag_with_both_kinds_under_it() {
        let keys = Keyspace::new(&KeyPrefix::default()).room(&room("forum/7"));
        assert_eq!(keys.users.current, "{presence:room:forum/7}:users:current");
        assert_eq!(keys.guests.old, "{presence:room:forum/7}:guests:old");
        assert_eq!(keys.users.interval, "{presence:room:forum/7}:users:interval");
        assert_eq!(keys.version, "{presence:room:forum/7}:version");
        assert_eq!(keys.users.watched, "{presence:room:forum/7}:watched");
        assert_eq!(keys.guests.changes, "{presence:room:forum/7}:changes");
        for key in keys.all() {
            assert_eq!(hash_tag(key), "presence:room:forum/7", "{key}");
        }
    }

    #[test]
    fn braces_and_percent_in_a_room_name_are_escaped_so_the_tag_is_the_whole_name() {
        let keys = Keyspace::new(&KeyPrefix::default());
        let tricky = keys.room(&room("a}b{c%"));
        assert_eq!(tricky.users.current, "{presence:room:a%7Db%7Bc%25}:users:current");
        let other = keys.room(&room("a%7Db%7Bc%25"));
        assert_ne!(tricky.users.current, other.users.current);
    }

    #[test]
    fn the_prefix_goes_inside_the_hash_tag() {
        let prefix = KeyPrefix::parse("staging:eu-1").expect("a valid prefix");
        let keys = Keyspace::new(&prefix);
        assert_eq!(keys.site(Kind::Users).kind.current, "{staging:eu-1:users}:current");
        assert_eq!(
            keys.room(&room("x")).users.current,
            "{staging:eu-1:room:x}:users:current"
        );
    }

    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').expect("a hash tag opens");
        let close = key[open..].find('}').expect("a hash tag closes") + open;
        &key[open + 1..close]
    }

    #[test]
    fn all_keys_of_one_site_kind_share_one_hash_tag_and_kinds_differ() {
        let keys = Keyspace::new(&KeyPrefix::default());
        for kind in Kind::ALL {
            let site = keys.site(kind);
            let k = &site.kind;
            for key in [
                &k.old,
                &k.interval,
                &k.leaving,
                &k.seq,
                &k.watched,
                &k.changes,
                &site.memberships_current,
                &site.memberships_old,
            ] {
                assert_eq!(hash_tag(&k.current), hash_tag(key), "{key}");
            }
        }
        let users = hash_tag(&keys.site(Kind::Users).kind.current);
        assert_ne!(users, hash_tag(&keys.site(Kind::Guests).kind.current));
        assert_eq!(users, hash_tag(&keys.last_seen));
        assert_eq!(users, hash_tag(&keys.filter.replicas));
        assert_eq!(users, hash_tag(&keys.filter.direct("x")));
        let index = &keys.rooms;
        for key in [&index.users, &index.indexed, &index.seen(0), &index.sweep] {
            assert_eq!(hash_tag(&index.names), hash_tag(key));
        }
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
    fn sets_leave_with_unlink_and_never_a_blocking_delete() {
        for script in [
            SITE_REPORT_SCRIPT,
            ROOM_REPORT_SCRIPT,
            PAGE_SCRIPT,
            PROBE_SCRIPT,
            ROOM_COUNTS_SCRIPT,
            SITE_LEAVE_SCRIPT,
        ] {
            assert!(!script.contains("'DEL'"));
            assert!(script.contains("redis.call('UNLINK', set)"));
        }
        let unlink = SITE_REPORT_SCRIPT.find("retire(k.old").unwrap_or(usize::MAX);
        let rename = SITE_REPORT_SCRIPT.find("'RENAME', k.current, k.old").unwrap_or(0);
        assert!(unlink < rename, "old must be gone before RENAME overwrites it");
    }

    #[test]
    fn separators_are_control_characters_that_no_name_may_hold() {
        assert!(MEMBERSHIP_SEPARATOR.is_control());
        assert!(MESSAGE_SEPARATOR.is_control());
        assert!(crate::domain::Username::parse("a\nb".into()).is_err());
        assert!(Scope::parse("a\0b".into()).is_err());
    }
}
