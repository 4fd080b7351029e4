//! The `presence.v1.Presence` gRPC service: the edge where wire messages
//! become domain values, and results become responses or statuses.
//!
//! Every unary call runs under [`PresenceService::call`], which keeps the
//! promises that hold for all of them: the metrics see every outcome (a
//! call whose client went away counts as `Cancelled`), a client's deadline
//! ends the call with `DEADLINE_EXCEEDED` by that deadline, and store
//! failures are logged once per outage.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use futures_util::Stream;
use prost_types::Timestamp;
use tokio::{sync::Semaphore, time::Instant};
use tonic::{Code, Request, Response, Status, metadata::MetadataMap};

use crate::domain::{
    Cursor, Kind, KindPage, OnlinePageToken, PageSize, RoomOrder, RoomsPage, RoomsPageToken, Scope, Username, Visitors,
};
use crate::encoded::EncodedListOnline;
use crate::error::{ApiError, OutageLog};
use crate::guests::GuestPrivacy;
use crate::metrics::{CallType, Metrics};
use crate::proto::server::presence_server;
use crate::proto::v1::{
    CheckOnlineRequest, CheckOnlineResponse, CountOnlineRequest, CountOnlineResponse, GuestStatus, LeaveRequest,
    LeaveResponse, ListOnlineRequest, ListOnlineResponse, ListRoomsRequest, ListRoomsResponse, ReportBatchRequest,
    ReportBatchResponse, ReportGuestRequest, ReportGuestResponse, ReportUserRequest, ReportUserResponse, Room,
    UserStatus, WatchOnlineRequest, WatchOnlineResponse,
};
use crate::shared_reads::SharedReads;
use crate::store::{Store, StoreError};
use crate::watch::WatchHub;

/// The most entries one `ReportBatch`, `CheckOnline` or `Leave` may carry,
/// users and guests together. It bounds the work and the size of one
/// atomic Redis script call.
pub const MAX_BATCH_ENTRIES: usize = 1000;

/// How many bad entries an error message lists before it says "and N more".
const MAX_LISTED_ERRORS: usize = 10;

/// A call ends a little before the client's deadline (a tenth of it,
/// between these bounds), so that our `DEADLINE_EXCEEDED` reaches the
/// client before its own timer fires: some clients (tonic's) report their
/// own timer as `CANCELLED`.
const DEADLINE_MARGIN: (Duration, Duration) = (Duration::from_millis(2), Duration::from_millis(50));

const SERVICE: &str = presence_server::SERVICE_NAME;

pub struct PresenceService {
    store: Arc<dyn Store>,
    metrics: Metrics,
    watches: Arc<WatchHub>,
    outage: OutageLog,
    /// The longest a call waits for the store when the client set no
    /// shorter deadline.
    store_timeout: Duration,
    /// What is stored of a guest's address.
    guests: GuestPrivacy,
    /// Concurrent identical pages share one store read (of both kinds at
    /// once: one wait per call, not two) and one encoding.
    lists: SharedReads<PagesKey, EncodedListOnline>,
    /// Concurrent counts of a scope share one store read.
    counts: SharedReads<Scope, (u64, u64)>,
    /// The same for pages of rooms.
    room_pages: SharedReads<RoomsKey, RoomsPage>,
    /// One permit per unary call being worked on; none left: refuse.
    in_flight: Arc<Semaphore>,
}

/// One page of each kind in one scope: for users, then guests, where it
/// starts and its size (0: a count).
type PagesKey = (Scope, [(Option<String>, usize); 2]);

/// One page of rooms: the order, where it starts, its size.
type RoomsKey = (RoomOrder, Option<RoomsPageToken>, usize);

impl PresenceService {
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Metrics,
        watches: Arc<WatchHub>,
        outage: OutageLog,
        store_timeout: Duration,
    ) -> Self {
        Self {
            store,
            metrics,
            watches,
            outage,
            store_timeout,
            guests: GuestPrivacy::Plain,
            lists: SharedReads::new(),
            counts: SharedReads::new(),
            room_pages: SharedReads::new(),
            in_flight: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
        }
    }

    /// Refuses calls at once past this many in flight
    /// (`PRESENCE_MAX_IN_FLIGHT`). When the calls arrive faster than the
    /// replica can answer them, queueing them all would make every call
    /// slow; refusing the excess keeps the accepted ones fast, and tells
    /// clients to back off or go to another replica.
    pub fn with_max_in_flight(self, max: usize) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            ..self
        }
    }

    /// Answers lists, counts and lists of rooms from a read up to `age`
    /// old (`PRESENCE_LIST_CACHE`; zero, the default: never from the past).
    pub fn with_list_cache(self, age: Duration) -> Self {
        Self {
            lists: SharedReads::new().with_cache(age),
            counts: SharedReads::new().with_cache(age),
            room_pages: SharedReads::new().with_cache(age),
            ..self
        }
    }

    /// Stores guests in this form (plain by default).
    pub fn with_guests(self, guests: GuestPrivacy) -> Self {
        Self { guests, ..self }
    }

    /// Runs one unary call: within the client's deadline, recorded in the
    /// metrics whatever its outcome (even if the client goes away and the
    /// call is dropped half-way).
    async fn call<T>(
        &self,
        method: &'static str,
        deadline: Option<Instant>,
        call: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<Response<T>, Status> {
        let mut observed = Observed::start(&self.metrics, CallType::Unary, method);
        let admitted = self.in_flight.clone().try_acquire_owned().ok();
        let result = match (&admitted, deadline) {
            (None, _) => Err(ApiError::Overloaded),
            (Some(_), Some(deadline)) => match tokio::time::timeout_at(deadline, call).await {
                // The store may give up at the same instant, its own way:
                // past the client's deadline, the deadline is the answer.
                Ok(Err(ApiError::Unavailable(_) | ApiError::Overloaded)) if Instant::now() >= deadline => {
                    Err(ApiError::DeadlineExceeded)
                }
                Ok(result) => result,
                Err(_) => Err(ApiError::DeadlineExceeded),
            },
            (Some(_), None) => call.await,
        };
        drop(admitted);
        match &result {
            Err(ApiError::Unavailable(error)) => {
                self.metrics.redis_error(method);
                self.outage.failed(method, error);
            }
            Err(ApiError::Overloaded) => self.metrics.shed(method),
            Ok(_) => self.outage.answered(),
            Err(_) => {}
        }
        observed.finish(result.as_ref().map_or_else(|e| e.code(), |_| Code::Ok));
        result.map(Response::new).map_err(Status::from)
    }

    /// When a report must give up waiting in the queue: the client's
    /// deadline, or the store timeout if sooner.
    fn store_deadline(&self, deadline: Option<Instant>) -> Instant {
        let own = Instant::now() + self.store_timeout;
        deadline.map_or(own, |d| d.min(own))
    }

    async fn report(
        &self,
        parsed: Result<(Scope, Visitors), ApiError>,
        deadline: Option<Instant>,
    ) -> Result<(), ApiError> {
        let (scope, visitors) = parsed?;
        if !visitors.is_empty() {
            self.store
                .report(&scope, visitors, self.store_deadline(deadline))
                .await?;
        }
        Ok(())
    }

    /// One page of both lists of `scope`, encoded, through [`SharedReads`]:
    /// callers asking for the same page at once share a read that began
    /// after they asked, and its encoding.
    async fn list_page(
        &self,
        scope: &Scope,
        token: OnlinePageToken,
        size: PageSize,
    ) -> Result<EncodedListOnline, ApiError> {
        // A finished list still gives its exact count on every page.
        let part = |cursor: &Cursor| {
            let size = if cursor.is_done() { 0 } else { size.get() };
            (cursor.after().map(str::to_owned), size)
        };
        let key = (scope.clone(), [part(&token.users), part(&token.guests)]);
        let (store, scope, [users_part, guests_part]) = (self.store.clone(), scope.clone(), key.1.clone());
        let page = self.lists.read(key, move || async move {
            let (users, guests) = store
                .pages(
                    &scope,
                    (users_part.0.as_deref(), users_part.1),
                    (guests_part.0.as_deref(), guests_part.1),
                )
                .await?;
            Ok(EncodedListOnline::new(&list_response(&scope, &token, users, guests)))
        });
        Ok(page.await?)
    }

    /// The users and guests online in `scope`, shared the same way.
    async fn counts(&self, scope: &Scope) -> Result<(u64, u64), ApiError> {
        let (store, own_scope) = (self.store.clone(), scope.clone());
        let counts = self.counts.read(scope.clone(), move || async move {
            let (users, guests) = store.pages(&own_scope, (None, 0), (None, 0)).await?;
            Ok((users.total, guests.total))
        });
        Ok(counts.await?)
    }

    /// A page of rooms, shared the same way.
    async fn shared_rooms(
        &self,
        order: RoomOrder,
        after: Option<RoomsPageToken>,
        size: usize,
    ) -> Result<RoomsPage, StoreError> {
        let key = (order, after.clone(), size);
        let store = self.store.clone();
        self.room_pages
            .read(
                key,
                move || async move { store.rooms(order, after.as_ref(), size).await },
            )
            .await
    }
}

/// Records one call in the metrics: started now, and handled with a code
/// when finished, or as `Cancelled` if dropped before (the client went away
/// and tonic dropped the call).
struct Observed<'a> {
    metrics: &'a Metrics,
    call: CallType,
    method: &'static str,
    started: Instant,
    finished: bool,
}

impl<'a> Observed<'a> {
    fn start(metrics: &'a Metrics, call: CallType, method: &'static str) -> Self {
        metrics.rpc_started(call, SERVICE, method);
        Self {
            metrics,
            call,
            method,
            started: Instant::now(),
            finished: false,
        }
    }

    fn finish(&mut self, code: Code) {
        if !self.finished {
            self.finished = true;
            self.metrics
                .rpc_handled(self.call, SERVICE, self.method, code, self.started.elapsed());
        }
    }
}

impl Drop for Observed<'_> {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// A page of both lists as the client gets it: each list's part, the
/// exact counts, and the token for the page after (whose cursors go on
/// from the last name given, or are done).
fn list_response(scope: &Scope, token: &OnlinePageToken, users: KindPage, guests: KindPage) -> ListOnlineResponse {
    let cursor = |page: &KindPage, was: &Cursor| match page.names.last() {
        _ if page.done || was.is_done() => Cursor::Done,
        Some(last) => Cursor::After(last.clone()),
        None => was.clone(),
    };
    let next = OnlinePageToken {
        users: cursor(&users, &token.users),
        guests: cursor(&guests, &token.guests),
    };
    ListOnlineResponse {
        next_page_token: next.encode(scope),
        user_count: users.total,
        guest_count: guests.total,
        users: users.names,
        guests: guests.names,
    }
}

/// The client's deadline, from the `grpc-timeout` header, less a margin.
pub fn deadline_of(metadata: &MetadataMap) -> Option<Instant> {
    let timeout = metadata.get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(timeout)?;
    let margin = (timeout / 10).clamp(DEADLINE_MARGIN.0, DEADLINE_MARGIN.1);
    Some(Instant::now() + timeout.saturating_sub(margin))
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.checked_mul(3600)?),
        "M" => Duration::from_secs(value.checked_mul(60)?),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchOnlineResponse, Status>> + Send>>;

#[tonic::async_trait]
impl presence_server::Presence for PresenceService {
    async fn report_user(&self, request: Request<ReportUserRequest>) -> Result<Response<ReportUserResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let request = request.into_inner();
        let parsed = parse_scope(request.room).and_then(|scope| {
            let user = Username::parse(request.username).map_err(|e| ApiError::invalid("username", e))?;
            Ok((
                scope,
                Visitors {
                    users: vec![user],
                    guests: Vec::new(),
                },
            ))
        });
        self.call("ReportUser", deadline, async {
            self.report(parsed, deadline).await?;
            Ok(ReportUserResponse {})
        })
        .await
    }

    async fn report_guest(
        &self,
        request: Request<ReportGuestRequest>,
    ) -> Result<Response<ReportGuestResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let request = request.into_inner();
        let parsed = parse_scope(request.room).and_then(|scope| {
            let guest = self
                .guests
                .parse(&request.ip_address)
                .map_err(|e| ApiError::invalid("ip_address", e))?;
            Ok((
                scope,
                Visitors {
                    users: Vec::new(),
                    guests: vec![guest],
                },
            ))
        });
        self.call("ReportGuest", deadline, async {
            self.report(parsed, deadline).await?;
            Ok(ReportGuestResponse {})
        })
        .await
    }

    async fn report_batch(
        &self,
        request: Request<ReportBatchRequest>,
    ) -> Result<Response<ReportBatchResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let request = request.into_inner();
        let parsed = parse_scope(request.room).and_then(|scope| {
            Ok((
                scope,
                parse_visitors(request.usernames, &request.ip_addresses, &self.guests)?,
            ))
        });
        self.call("ReportBatch", deadline, async {
            self.report(parsed, deadline).await?;
            Ok(ReportBatchResponse {})
        })
        .await
    }

    async fn list_online(&self, request: Request<ListOnlineRequest>) -> Result<Response<EncodedListOnline>, Status> {
        let deadline = deadline_of(request.metadata());
        let request = request.into_inner();
        self.call("ListOnline", deadline, async {
            let scope = parse_scope(request.room)?;
            let size = PageSize::coerce(request.limit);
            let token =
                OnlinePageToken::parse(&request.page_token, &scope).map_err(|e| ApiError::invalid("page_token", e))?;
            self.list_page(&scope, token, size).await
        })
        .await
    }

    async fn count_online(
        &self,
        request: Request<CountOnlineRequest>,
    ) -> Result<Response<CountOnlineResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let request = request.into_inner();
        self.call("CountOnline", deadline, async {
            let scope = parse_scope(request.room)?;
            let (user_count, guest_count) = self.counts(&scope).await?;
            Ok(CountOnlineResponse {
                user_count,
                guest_count,
            })
        })
        .await
    }

    async fn check_online(
        &self,
        request: Request<CheckOnlineRequest>,
    ) -> Result<Response<CheckOnlineResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let request = request.into_inner();
        self.call("CheckOnline", deadline, async {
            let scope = parse_scope(request.room)?;
            let visitors = parse_visitors(request.usernames, &request.ip_addresses, &self.guests)?;
            let users = visitors.names(Kind::Users);
            let guests = visitors.names(Kind::Guests);
            let ((users_online, last_seen), guests_online) = tokio::try_join!(
                self.store.check_users(&scope, &users),
                self.store.check(&scope, Kind::Guests, &guests),
            )?;
            Ok(CheckOnlineResponse {
                users: users
                    .iter()
                    .zip(users_online)
                    .zip(last_seen)
                    .map(|((name, online), seen)| UserStatus {
                        username: (*name).to_owned(),
                        online,
                        last_seen: seen.map(timestamp),
                    })
                    .collect(),
                guests: guests
                    .iter()
                    .zip(guests_online)
                    .map(|(address, online)| GuestStatus {
                        ip_address: (*address).to_owned(),
                        online,
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let request = request.into_inner();
        self.call("Leave", deadline, async {
            let scope = parse_scope(request.room)?;
            let visitors = parse_visitors(request.usernames, &request.ip_addresses, &self.guests)?;
            if !visitors.is_empty() {
                self.store.leave(&scope, &visitors).await?;
            }
            Ok(LeaveResponse {})
        })
        .await
    }

    async fn list_rooms(&self, request: Request<ListRoomsRequest>) -> Result<Response<ListRoomsResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let request = request.into_inner();
        self.call("ListRooms", deadline, async {
            let order = match request.order {
                2 => RoomOrder::MostOnline,
                // UNSPECIFIED, NAME, and values this server does not know.
                _ => RoomOrder::Name,
            };
            let size = PageSize::coerce(request.limit);
            let token = RoomsPageToken::parse(&request.page_token, order == RoomOrder::MostOnline)
                .map_err(|e| ApiError::invalid("page_token", e))?;
            let page = self.shared_rooms(order, token, size.get()).await?;
            Ok(ListRoomsResponse {
                rooms: page
                    .rooms
                    .into_iter()
                    .map(|r| Room {
                        name: r.room,
                        user_count: r.counts.users,
                        guest_count: r.counts.guests,
                    })
                    .collect(),
                next_page_token: page.next.map(|t| t.encode()).unwrap_or_default(),
            })
        })
        .await
    }

    type WatchOnlineStream = WatchStream;

    async fn watch_online(
        &self,
        request: Request<WatchOnlineRequest>,
    ) -> Result<Response<Self::WatchOnlineStream>, Status> {
        let mut observed = Observed::start(&self.metrics, CallType::ServerStream, "WatchOnline");
        let scope = match parse_scope(request.into_inner().room) {
            Ok(scope) => scope,
            Err(error) => {
                observed.finish(error.code());
                return Err(error.into());
            }
        };
        // The stream records its own end (see watch.rs).
        observed.finished = true;
        Ok(Response::new(Box::pin(self.watches.watch(scope))))
    }
}

fn timestamp(unix_ms: u64) -> Timestamp {
    let ms = i64::try_from(unix_ms).unwrap_or(i64::MAX);
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn parse_scope(room: String) -> Result<Scope, ApiError> {
    Scope::parse(room).map_err(|e| ApiError::invalid("room", e))
}

/// Many names at once, for `ReportBatch`, `CheckOnline` and `Leave`: all
/// or nothing. Every bad entry is named, and one bad entry refuses the
/// whole call, so a caller never has to guess what was done.
fn parse_visitors(usernames: Vec<String>, ip_addresses: &[String], mode: &GuestPrivacy) -> Result<Visitors, ApiError> {
    let entries = usernames.len() + ip_addresses.len();
    if entries > MAX_BATCH_ENTRIES {
        return Err(ApiError::invalid(
            "usernames, ip_addresses",
            format!("at most {MAX_BATCH_ENTRIES} entries in all, got {entries}"),
        ));
    }
    let mut problems = Vec::new();
    let mut users = Vec::with_capacity(usernames.len());
    for (i, name) in usernames.into_iter().enumerate() {
        match Username::parse(name) {
            Ok(user) => users.push(user),
            Err(e) => problems.push(format!("usernames[{i}]: {e}")),
        }
    }
    let mut guests = Vec::with_capacity(ip_addresses.len());
    for (i, address) in ip_addresses.iter().enumerate() {
        match mode.parse(address) {
            Ok(guest) => guests.push(guest),
            Err(e) => problems.push(format!("ip_addresses[{i}]: {e}")),
        }
    }
    if problems.is_empty() {
        return Ok(Visitors { users, guests });
    }
    let more = problems.len().saturating_sub(MAX_LISTED_ERRORS);
    problems.truncate(MAX_LISTED_ERRORS);
    let mut message = problems.join("; ");
    if more > 0 {
        message.push_str(&format!("; and {more} more"));
    }
    Err(ApiError::InvalidArgument(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(usernames: &[&str], ip_addresses: &[&str]) -> Result<Visitors, ApiError> {
        let ips: Vec<String> = ip_addresses.iter().map(|s| s.to_string()).collect();
        parse_visitors(
            usernames.iter().map(|s| s.to_string()).collect(),
            &ips,
            &GuestPrivacy::Plain,
        )
    }

    fn message(result: Result<Visitors, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidArgument(message)) => message,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_batch_names_every_bad_entry() {
        let message = message(batch(&["ok", "", " x"], &["10.0.0.1", "1.2.3.4:80"]));
        assert_eq!(
            message,
            "usernames[1]: must not be empty; usernames[2]: must not start or end with whitespace; \
             ip_addresses[1]: must be an IPv4 or IPv6 address without a port"
        );
    }

    #[test]
    fn a_batch_lists_at_most_ten_problems_and_counts_the_rest() {
        let bad = vec![""; 15];
        let message = message(batch(&bad, &[]));
        assert!(
            message.ends_with("usernames[9]: must not be empty; and 5 more"),
            "{message}"
        );
    }

    #[test]
    fn a_batch_over_the_maximum_is_refused_whole() {
        let names: Vec<String> = (0..=MAX_BATCH_ENTRIES).map(|i| format!("user{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let message = message(batch(&names, &[]));
        assert!(message.contains("at most 1000 entries"), "{message}");
    }

    #[test]
    fn a_valid_batch_keeps_guests_canonical() {
        let visitors = batch(&["alice"], &["::ffff:10.0.0.1"]).expect("valid");
        assert_eq!(visitors.guests[0].as_str(), "10.0.0.1");
        assert_eq!(visitors.users[0].as_str(), "alice");
    }

    #[test]
    fn a_bad_room_is_refused_naming_the_field() {
        match parse_scope("a\nb".into()) {
            Err(ApiError::InvalidArgument(message)) => assert!(message.starts_with("room: "), "{message}"),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_nonsense_is_ignored() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "10", "10x", "123456789S", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn last_seen_becomes_a_protobuf_timestamp() {
        assert_eq!(
            timestamp(1_700_000_000_123),
            Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_000_000
            }
        );
    }
}
