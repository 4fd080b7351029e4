//! The `presence.v1.Presence` gRPC service: the edge where wire messages
//! become domain values, and results become responses or statuses.

use std::{future::Future, num::NonZeroUsize, sync::Arc, time::Instant};

use tonic::{Code, Request, Response, Status};

use crate::domain::{GuestAddress, Online, Username, Visitors};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::proto::v1::{
    ListOnlineRequest, ListOnlineResponse, ReportBatchRequest, ReportBatchResponse, ReportGuestRequest,
    ReportGuestResponse, ReportUserRequest, ReportUserResponse, presence_server,
};
use crate::store::Store;

/// The most entries one `ReportBatch` may carry, users and guests together.
/// It bounds the work and the size of one atomic Redis script call.
pub const MAX_BATCH_ENTRIES: usize = 1000;

/// How many bad entries an error message lists before it says "and N more".
const MAX_LISTED_ERRORS: usize = 10;

const SERVICE: &str = presence_server::SERVICE_NAME;

pub struct PresenceService {
    store: Arc<dyn Store>,
    metrics: Metrics,
}

impl PresenceService {
    pub fn new(store: Arc<dyn Store>, metrics: Metrics) -> Self {
        Self { store, metrics }
    }

    /// Runs one call and records it in the metrics, whatever its outcome.
    async fn observed<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<Response<T>, Status> {
        self.metrics.rpc_started(SERVICE, method);
        let started = Instant::now();
        let result = call.await;
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(error) => error.code(),
        };
        if let Err(ApiError::Unavailable(_)) = &result {
            self.metrics.redis_error(method);
        }
        self.metrics.rpc_handled(SERVICE, method, code, started.elapsed());
        result.map(Response::new).map_err(Status::from)
    }

    async fn report(&self, visitors: Result<Visitors, ApiError>) -> Result<(), ApiError> {
        let visitors = visitors?;
        if !visitors.is_empty() {
            self.store.report(&visitors).await?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl presence_server::Presence for PresenceService {
    async fn report_user(&self, request: Request<ReportUserRequest>) -> Result<Response<ReportUserResponse>, Status> {
        let visitors = Visitors::try_from(request.into_inner());
        self.observed("ReportUser", async {
            self.report(visitors).await?;
            Ok(ReportUserResponse {})
        })
        .await
    }

    async fn report_guest(
        &self,
        request: Request<ReportGuestRequest>,
    ) -> Result<Response<ReportGuestResponse>, Status> {
        let visitors = Visitors::try_from(request.into_inner());
        self.observed("ReportGuest", async {
            self.report(visitors).await?;
            Ok(ReportGuestResponse {})
        })
        .await
    }

    async fn report_batch(
        &self,
        request: Request<ReportBatchRequest>,
    ) -> Result<Response<ReportBatchResponse>, Status> {
        let visitors = Visitors::try_from(request.into_inner());
        self.observed("ReportBatch", async {
            self.report(visitors).await?;
            Ok(ReportBatchResponse {})
        })
        .await
    }

    async fn list_online(&self, request: Request<ListOnlineRequest>) -> Result<Response<ListOnlineResponse>, Status> {
        let limit = usize::try_from(request.into_inner().limit)
            .ok()
            .and_then(NonZeroUsize::new);
        self.observed("ListOnline", async {
            let online = self.store.list_online(limit).await?;
            Ok(ListOnlineResponse::from(online))
        })
        .await
    }
}

impl TryFrom<ReportUserRequest> for Visitors {
    type Error = ApiError;
    fn try_from(request: ReportUserRequest) -> Result<Self, ApiError> {
        let user = Username::parse(request.username).map_err(|e| ApiError::invalid("username", e))?;
        Ok(Visitors {
            users: vec![user],
            guests: Vec::new(),
        })
    }
}

impl TryFrom<ReportGuestRequest> for Visitors {
    type Error = ApiError;
    fn try_from(request: ReportGuestRequest) -> Result<Self, ApiError> {
        let guest = GuestAddress::parse(&request.ip_address).map_err(|e| ApiError::invalid("ip_address", e))?;
        Ok(Visitors {
            users: Vec::new(),
            guests: vec![guest],
        })
    }
}

impl TryFrom<ReportBatchRequest> for Visitors {
    type Error = ApiError;

    /// All or nothing: every bad entry is named, and one bad entry refuses
    /// the whole batch, so a caller never has to guess what was stored.
    fn try_from(request: ReportBatchRequest) -> Result<Self, ApiError> {
        let entries = request.usernames.len() + request.ip_addresses.len();
        if entries > MAX_BATCH_ENTRIES {
            return Err(ApiError::invalid(
                "usernames, ip_addresses",
                format!("at most {MAX_BATCH_ENTRIES} entries in all, got {entries}"),
            ));
        }
        let mut problems = Vec::new();
        let mut users = Vec::with_capacity(request.usernames.len());
        for (i, name) in request.usernames.into_iter().enumerate() {
            match Username::parse(name) {
                Ok(user) => users.push(user),
                Err(e) => problems.push(format!("usernames[{i}]: {e}")),
            }
        }
        let mut guests = Vec::with_capacity(request.ip_addresses.len());
        for (i, address) in request.ip_addresses.iter().enumerate() {
            match GuestAddress::parse(address) {
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
}

impl From<Online> for ListOnlineResponse {
    fn from(online: Online) -> Self {
        Self {
            users: online.users.names,
            guests: online.guests.names,
            user_count: online.users.total,
            guest_count: online.guests.total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(usernames: &[&str], ip_addresses: &[&str]) -> ReportBatchRequest {
        ReportBatchRequest {
            usernames: usernames.iter().map(|s| s.to_string()).collect(),
            ip_addresses: ip_addresses.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn message(result: Result<Visitors, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidArgument(message)) => message,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_batch_names_every_bad_entry() {
        let message = message(Visitors::try_from(batch(
            &["ok", "", " x"],
            &["10.0.0.1", "1.2.3.4:80"],
        )));
        assert_eq!(
            message,
            "usernames[1]: must not be empty; usernames[2]: must not start or end with whitespace; \
             ip_addresses[1]: must be an IPv4 or IPv6 address without a port"
        );
    }

    #[test]
    fn a_batch_lists_at_most_ten_problems_and_counts_the_rest() {
        let bad = vec![""; 15];
        let message = message(Visitors::try_from(batch(&bad, &[])));
        assert!(
            message.ends_with("usernames[9]: must not be empty; and 5 more"),
            "{message}"
        );
    }

    #[test]
    fn a_batch_over_the_maximum_is_refused_whole() {
        let names: Vec<String> = (0..=MAX_BATCH_ENTRIES).map(|i| format!("user{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let message = message(Visitors::try_from(batch(&names, &[])));
        assert!(message.contains("at most 1000 entries"), "{message}");
    }

    #[test]
    fn a_valid_batch_keeps_guests_canonical() {
        let visitors = Visitors::try_from(batch(&["alice"], &["::ffff:10.0.0.1"])).expect("valid");
        assert_eq!(visitors.guests[0].as_str(), "10.0.0.1");
        assert_eq!(visitors.users[0].as_str(), "alice");
    }

    #[test]
    fn a_bad_username_is_refused_naming_the_field() {
        let request = ReportUserRequest {
            username: String::new(),
        };
        assert_eq!(message(Visitors::try_from(request)), "username: must not be empty");
    }

    #[test]
    fn a_bad_ip_address_is_refused_naming_the_field() {
        let request = ReportGuestRequest {
            ip_address: "nope".into(),
        };
        assert!(message(Visitors::try_from(request)).starts_with("ip_address: "));
    }
}
