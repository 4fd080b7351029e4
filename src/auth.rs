//! Bearer tokens with two roles, checked in one place: a tower layer in
//! front of every service on the gRPC port.
//!
//! - `report` may call `ReportUser`, `ReportGuest`, `ReportBatch` and
//!   `Leave`: what a web backend needs, and nothing that shows who is online.
//! - `read` may call everything: the lists, counts and checks, the rooms,
//!   `WatchOnline`, server reflection, and the report calls too.
//!
//! Health needs no token, so that probes and load balancers work. Any other
//! method, including one this table does not know yet, needs `read`: a new
//! RPC is closed until someone decides otherwise (a unit test lists every
//! RPC of the proto, so that decision cannot be forgotten).
//!
//! Tokens are kept only as SHA-256 digests, and a presented token is
//! compared with every one of them in constant time, so neither the answer
//! nor its timing tells which tokens exist. Refusals say only
//! `UNAUTHENTICATED` (no token, or an unknown one) or `PERMISSION_DENIED`
//! (a token whose role does not allow the call).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use ring::digest;
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::locks::{lock, read_lock, write_lock};
use crate::metrics::{CallType, Metrics};
use crate::proto::server::presence_server::SERVICE_NAME as PRESENCE;
use crate::reload::{self, Snapshot};
use crate::settings::SettingError;

const SETTING: (&str, &str) = ("--auth-tokens-file", "PRESENCE_AUTH_TOKENS_FILE");

/// The shortest token accepted: `openssl rand -hex 16` and up.
pub const MIN_TOKEN_LEN: usize = 32;

/// What a token may do. `Read` includes everything `Report` may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Report,
    Read,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Report => "report",
            Role::Read => "read",
        }
    }

    fn code(self) -> u8 {
        match self {
            Role::Report => 1,
            Role::Read => 2,
        }
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    Needs(Role),
}

/// The Presence methods a `report` token may call.
const REPORT_METHODS: [&str; 4] = ["ReportUser", "ReportGuest", "ReportBatch", "Leave"];

/// The Presence methods, for metric labels (never a label from the wire).
const PRESENCE_METHODS: [&str; 9] = [
    "ReportUser",
    "ReportGuest",
    "ReportBatch",
    "ListOnline",
    "CountOnline",
    "CheckOnline",
    "Leave",
    "ListRooms",
    "WatchOnline",
];

/// What the gRPC method at `path` (`/package.Service/Method`) needs.
pub fn access(path: &str) -> Access {
    if path.starts_with("/grpc.health.v1.Health/") {
        return Access::Open;
    }
    match presence_method(path) {
        Some(method) if REPORT_METHODS.contains(&method) => Access::Needs(Role::Report),
        _ => Access::Needs(Role::Read),
    }
}

fn presence_method(path: &str) -> Option<&str> {
    path.strip_prefix('/')?.strip_prefix(PRESENCE)?.strip_prefix('/')
}

/// The tokens of a token file, as SHA-256 digests with their roles.
#[derive(Clone, Default)]
pub struct Tokens {
    digests: Vec<([u8; 32], Role)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokens({} report, {} read)",
            self.count(Role::Report),
            self.count(Role::Read)
        )
    }
}

/// Why a token file was refused: a line number and a reason, never the
/// token (nor any word of the line, which may be a token misplaced).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFileError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("it holds no token (one a line: `ROLE TOKEN`, ROLE `report` or `read`)")]
    Empty,
}

impl Tokens {
    /// One token a line, `ROLE TOKEN`; blank lines and lines starting with
    /// `#` are ignored.
    pub fn parse(text: &[u8]) -> Result<Self, TokenFileError> {
        let mut digests: Vec<([u8; 32], Role)> = Vec::new();
        let mut lines_of: Vec<usize> = Vec::new();
        for (index, raw) in text.split(|b| *b == b'\n').enumerate() {
            let line = index + 1;
            let bad = |reason: &str| TokenFileError::Line {
                line,
                reason: reason.to_owned(),
            };
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let Ok(content) = std::str::from_utf8(raw) else {
                return Err(bad("not UTF-8"));
            };
            let content = content.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let mut words = content.split_ascii_whitespace();
            let (Some(role), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad("expected `ROLE TOKEN`: two words separated by spaces"));
            };
            let role = match role {
                "report" => Role::Report,
                "read" => Role::Read,
                _ => return Err(bad("the role (first word) must be `report` or `read`")),
            };
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("the token must be visible ASCII characters only"));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(bad(&format!(
                    "the token is shorter than {MIN_TOKEN_LEN} characters (make one with `openssl rand -hex 32`)"
                )));
            }
            let digest = sha256(token.as_bytes());
            if let Some(first) = digests.iter().position(|(d, _)| *d == digest) {
                return Err(bad(&format!("the same token is on line {} already", lines_of[first])));
            }
            digests.push((digest, role));
            lines_of.push(line);
        }
        if digests.is_empty() {
            return Err(TokenFileError::Empty);
        }
        Ok(Self { digests })
    }

    /// The role of `presented`, if it is one of the tokens. Every token is
    /// compared, in constant time, whatever matches.
    pub fn role_of(&self, presented: &[u8]) -> Option<Role> {
        let digest = sha256(presented);
        let mut found = 0u8;
        for (known, role) in &self.digests {
            found = u8::conditional_select(&found, &role.code(), known.ct_eq(&digest));
        }
        match found {
            1 => Some(Role::Report),
            2 => Some(Role::Read),
            _ => None,
        }
    }

    pub fn count(&self, role: Role) -> usize {
        self.digests.iter().filter(|(_, r)| *r == role).count()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// The token file: its tokens, re-read when it changes.
pub struct TokenFile {
    path: PathBuf,
    tokens: RwLock<Arc<Tokens>>,
    seen: Mutex<Snapshot>,
}

impl TokenFile {
    /// Reads and parses the file; a problem is an error naming the setting
    /// and the line.
    pub fn load(path: &Path) -> Result<Self, SettingError> {
        let seen = Snapshot::read(&[path]);
        let tokens = read_tokens(path)?;
        Ok(Self {
            path: path.to_owned(),
            tokens: RwLock::new(Arc::new(tokens)),
            seen: Mutex::new(seen),
        })
    }

    pub fn tokens(&self) -> Arc<Tokens> {
        read_lock(&self.tokens).clone()
    }

    /// Re-reads the file if it changed. A good file replaces the tokens at
    /// once; a bad one is logged (line number only) and the tokens in use
    /// are kept. So a token is rotated by adding the new one, moving the
    /// callers to it, then removing the old one.
    pub fn reload_if_changed(&self) {
        let now = Snapshot::read(&[&self.path]);
        {
            let mut seen = lock(&self.seen);
            if *seen == now {
                return;
            }
            *seen = now;
        }
        match read_tokens(&self.path) {
            Ok(tokens) => {
                tracing::info!(
                    report = tokens.count(Role::Report),
                    read = tokens.count(Role::Read),
                    "token file reloaded"
                );
                *write_lock(&self.tokens) = Arc::new(tokens);
            }
            Err(error) => tracing::error!(%error, "token file changed but cannot be used; keeping the tokens in use"),
        }
    }
}

fn read_tokens(path: &Path) -> Result<Tokens, SettingError> {
    let text = reload::read(path).map_err(|reason| SettingError::new(SETTING.0, SETTING.1, reason))?;
    Tokens::parse(&text).map_err(|e| SettingError::new(SETTING.0, SETTING.1, format!("{}: {e}", path.display())))
}

/// Checks every call's token before it reaches a service. Without a token
/// file it lets everything through.
#[derive(Clone)]
pub struct AuthLayer {
    tokens: Option<Arc<TokenFile>>,
    metrics: Metrics,
}

impl AuthLayer {
    pub fn new(tokens: Option<Arc<TokenFile>>, metrics: Metrics) -> Self {
        Self { tokens, metrics }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tokens: self.tokens.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<TokenFile>>,
    metrics: Metrics,
}

impl<S> Auth<S> {
    /// Why the call is refused, if it is.
    fn refusal<B>(&self, request: &Request<B>) -> Option<Status> {
        let tokens = self.tokens.as_ref()?;
        let path = request.uri().path();
        let Access::Needs(needed) = access(path) else {
            return None;
        };
        let presented = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|value| bearer(value.as_bytes()));
        let status = match presented.and_then(|token| tokens.tokens().role_of(token)) {
            None => Status::unauthenticated("a valid `authorization: Bearer <token>` is needed"),
            Some(role) if role >= needed => return None,
            Some(role) => Status::permission_denied(format!(
                "a `{}` token may not call this method; it needs a `{}` token",
                role.as_str(),
                needed.as_str()
            )),
        };
        self.count(path, status.code());
        tracing::debug!(path, code = ?status.code(), "call refused");
        Some(status)
    }

    /// Counts a refused Presence call as handled, as the service counts
    /// the others (labels from the method table, never from the wire).
    fn count(&self, path: &str, code: Code) {
        let Some(method) = presence_method(path).and_then(|m| PRESENCE_METHODS.iter().find(|known| **known == m))
        else {
            return;
        };
        let call = if *method == "WatchOnline" {
            CallType::ServerStream
        } else {
            CallType::Unary
        };
        self.metrics.rpc_started(call, PRESENCE, method);
        self.metrics.rpc_handled(call, PRESENCE, method, code, Duration::ZERO);
    }
}

/// The token of `Bearer <token>` (the scheme in any case).
pub(crate) fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match self.refusal(&request) {
            Some(status) => Either::Left(ready(Ok(status.into_http()))),
            None => Either::Right(self.inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    const REPORT: &str = "3f9c0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    const READ: &str = "r0a1b2c3d4e5f60718293a4b5c6d7e8f9abcd";

    fn tokens() -> Tokens {
        Tokens::parse(format!("# comment\n\nreport {REPORT}\r\n  read\t{READ}  \n").as_bytes()).expect("valid")
    }

    #[test]
    fn tokens_are_found_with_their_role() {
        let tokens = tokens();
        assert_eq!(tokens.role_of(REPORT.as_bytes()), Some(Role::Report));
        assert_eq!(tokens.role_of(READ.as_bytes()), Some(Role::Read));
        assert_eq!(tokens.role_of(b"nope"), None);
        assert_eq!(tokens.role_of(&REPORT.as_bytes()[1..]), None);
        assert_eq!(tokens.role_of(b""), None);
    }

    #[test]
    fn a_malformed_line_is_refused_by_number_without_quoting_it() {
        let long = "x".repeat(40);
        let cases = [
            (format!("report {long}\nwrite {long}\n"), 2),
            ("\n\nreport\n".to_owned(), 3),
            (format!("report {long} extra\n"), 1),
            (format!("{long} report\n"), 1),
            ("read tiny\n".to_owned(), 1),
            (format!("read {long}\nreport {long}\n"), 2),
        ];
        for (text, line) in cases {
            let error = Tokens::parse(text.as_bytes()).expect_err("malformed");
            let message = error.to_string();
            assert!(message.starts_with(&format!("line {line}: ")), "{text:?}: {message}");
            assert!(!message.contains(&long) && !message.contains("tiny"), "{message}");
        }
        assert_eq!(Tokens::parse(b"\n# nothing\n").err(), Some(TokenFileError::Empty));
        assert!(matches!(
            Tokens::parse(b"read \xff\xfe"),
            Err(TokenFileError::Line { line: 1, .. })
        ));
    }

    #[test]
    fn a_token_is_taken_from_a_bearer_header_only() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer"), None);
    }

    #[test]
    fn health_is_open_reports_need_report_and_all_else_read() {
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(access("/grpc.health.v1.Health/Watch"), Access::Open);
        assert_eq!(access("/presence.v1.Presence/ReportUser"), Access::Needs(Role::Report));
        assert_eq!(access("/presence.v1.Presence/Leave"), Access::Needs(Role::Report));
        assert_eq!(access("/presence.v1.Presence/ListOnline"), Access::Needs(Role::Read));
        assert_eq!(access("/presence.v1.Presence/SomethingNew"), Access::Needs(Role::Read));
        assert_eq!(
            access("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Access::Needs(Role::Read)
        );
        assert_eq!(
            access("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Access::Needs(Role::Read)
        );
        assert_eq!(access("/presence.v1.PresenceX/ReportUser"), Access::Needs(Role::Read));
        assert_eq!(access("/grpc.health.v1.HealthX/Check"), Access::Needs(Role::Read));
    }

    /// Adding an RPC to the proto fails this test until its role is
    /// decided here (and in REPORT_METHODS if it only reports).
    #[test]
    fn every_rpc_of_the_proto_has_a_decided_role() {
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
        let mut methods: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter())
            .filter(|s| s.name() == "Presence")
            .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
            .collect();
        methods.sort();
        let mut known: Vec<String> = PRESENCE_METHODS.iter().map(|m| (*m).to_owned()).collect();
        known.sort();
        assert_eq!(methods, known, "a new RPC: decide its role in auth.rs");
        for method in REPORT_METHODS {
            assert!(PRESENCE_METHODS.contains(&method));
        }
    }

    #[test]
    fn debug_never_shows_a_token() {
        let text = format!("{:?}", tokens());
        assert_eq!(text, "Tokens(1 report, 1 read)");
    }
}
