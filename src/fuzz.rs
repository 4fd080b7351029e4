//! Fuzzing, as property tests: every parser that takes outside input, fed
//! generated input, must never panic, must keep what it promises for what
//! it accepts, and must never quote a secret in what it refuses.
//!
//! The parsers: a username, a guest address (and each guest mode), a room
//! (scope), both page tokens, the `grpc-timeout` header, the bearer header
//! and the token file, and the settings (flags and their values).
//!
//! `cargo test` runs each with proptest's default of 256 cases. The fuzzing
//! runs are `scripts/fuzz` (a million cases per parser, in release) and
//! `scripts/fuzz --short` (CI's pass): they set `PROPTEST_CASES`, which
//! proptest reads. A failure is shrunk to a smallest input and saved by
//! proptest under `proptest-regressions/`; commit that file, and the input
//! is run first, as a regression test, from then on.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config;

use crate::auth::{self, Tokens};
use crate::domain::{GuestAddress, OnlinePageToken, RoomsPageToken, Scope, Username};
use crate::guests::{GuestPrivacy, network};
use crate::settings::Settings;

/// The case count comes from `PROPTEST_CASES` (default 256); nothing is
/// forked, and a failure is saved for regression.
fn config() -> Config {
    Config {
        max_shrink_iters: 10_000,
        ..Config::default()
    }
}

/// Strings that look like what a client might send: mostly printable,
/// sometimes control characters, whitespace and multi-byte UTF-8.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,40}",
        "[ \\t\\n\\r\\x00\\x7f\\u{85}\\u{a0}\\u{2028}a-zé中😀]{0,12}",
        ".{250,260}",
    ]
}

/// Strings from the alphabet of IP addresses, so that near-misses are
/// common.
fn address_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-fA-F:.]{0,45}",
        "[0-9.]{7,15}",
        "[0-9a-f:]{2,39}(%[a-z0-9]{1,4})?",
        "(::ffff:)?[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,3}|:[0-9]{1,5})?",
        any::<String>(),
    ]
}

fn hmac_mode() -> GuestPrivacy {
    GuestPrivacy::Hashed(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[42u8; 32]))
}

/// What a page token decodes to, with a checksum that matches: the reader
/// gets past the checksum and is fuzzed on the record itself.
fn checksummed_token(body: Vec<u8>) -> String {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    let checksum = body.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut bytes = body;
    bytes.extend_from_slice(&checksum.to_be_bytes()[..4]);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn token_body() -> impl Strategy<Value = Vec<u8>> {
    (0u8..4, 0u8..5, proptest::collection::vec(any::<u8>(), 0..80)).prop_map(|(version, kind, rest)| {
        let mut body = vec![version, kind];
        body.extend(rest);
        body
    })
}

/// A line of a token file: good, malformed, or noise.
fn token_line() -> impl Strategy<Value = String> {
    let word = "[A-Za-z0-9_+/=.-]{1,70}";
    prop_oneof![
        ("(report|read)", "[ \\t]{1,3}", "[!-~]{32,70}").prop_map(|(r, s, t)| format!("{r}{s}{t}")),
        ("(report|read|write|READ)", "[ \\t]{0,2}", word).prop_map(|(r, s, t)| format!("{r}{s}{t}")),
        (word, " ", word, " ", word).prop_map(|(a, s, b, t, c)| format!("{a}{s}{b}{t}{c}")),
        "[ \\t]*#.{0,40}",
        "[ \\t]*",
        any::<String>(),
    ]
}

/// One flag and a value, from every setting, with values that are valid,
/// borderline or nonsense; and Redis URLs with a password, which must never
/// be printed whatever else is wrong.
fn setting() -> impl Strategy<Value = Vec<String>> {
    let flag = prop_oneof![
        Just("--listen"),
        Just("--redis-mode"),
        Just("--redis-sentinel-master"),
        Just("--tick-interval"),
        Just("--key-prefix"),
        Just("--metrics-listen"),
        Just("--redis-pool-size"),
        Just("--redis-timeout"),
        Just("--last-seen-precision"),
        Just("--last-seen-retention"),
        Just("--watch-interval"),
        Just("--max-concurrent-streams"),
        Just("--max-connection-age"),
        Just("--max-connection-age-grace"),
        Just("--shutdown-grace"),
        Just("--log-format"),
        Just("--tls-cert"),
        Just("--tls-key"),
        Just("--tls-client-ca"),
        Just("--health-listen"),
        Just("--auth-tokens-file"),
        Just("--redis-ca"),
        Just("--guest-addresses"),
        Just("--guest-hash-key-file"),
        Just("--no-such-flag"),
    ];
    let value = prop_oneof![
        "[0-9]{1,6}(ms|s|m|h|d|us|ns|M)?",
        "(0\\.0\\.0\\.0|127\\.0\\.0\\.1|\\[::1\\]|localhost):[0-9]{1,6}",
        "(single|cluster|sentinel|plain|truncated|hashed|text|json)",
        "/nonexistent/[a-z]{1,8}(\\.pem)?",
        text().prop_filter("no password here", |t| !t.contains("hunter2")),
    ];
    let url = prop_oneof![
        Just("redis://:hunter2-secret@localhost:6379".to_owned()),
        Just("rediss://user:hunter2-secret@[::1]:6380/3".to_owned()),
        "(redis|rediss|unix|http)?(://)?(user)?:hunter2-secret@[a-z0-9.:/\\[\\]%?=&]{0,20}",
    ];
    prop_oneof![
        3 => (flag, value).prop_map(|(flag, value)| vec![flag.to_owned(), value]),
        1 => url.prop_map(|url| vec!["--redis-url".to_owned(), url]),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn username(name in text()) {
        if let Ok(user) = Username::parse(name.clone()) {
            let stored = user.as_str();
            prop_assert!(!stored.is_empty() && stored.len() <= Username::MAX_BYTES);
            prop_assert!(!stored.chars().any(char::is_control));
            prop_assert_eq!(stored.trim(), stored);
            prop_assert_eq!(stored, name.as_str());
        }
    }

    #[test]
    fn guest_address_in_every_mode(text in address_like()) {
        let plain = GuestAddress::parse(&text);
        for mode in [GuestPrivacy::Plain, GuestPrivacy::Truncated, hmac_mode()] {
            // The same refusals in every mode; never a panic.
            let stored = mode.parse(&text);
            prop_assert_eq!(stored.is_ok(), plain.is_ok());
            prop_assert_eq!(stored.as_ref().err(), plain.as_ref().err());
        }
        if let Ok(address) = plain {
            // Canonical: stable under re-parsing.
            prop_assert_eq!(GuestAddress::parse(address.as_str()), Ok(address.clone()));
            let ip = GuestAddress::parse_ip(address.as_str()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let truncated = GuestPrivacy::Truncated.parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(truncated.as_str(), network(ip).to_string());
            let hashed = hmac_mode().parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(hashed.as_str().len(), 64);
            prop_assert!(hashed.as_str().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
    }

    #[test]
    fn room_scope(name in text()) {
        if let Ok(scope) = Scope::parse(name.clone()) {
            prop_assert_eq!(scope.as_str(), name.as_str());
            prop_assert!(name.len() <= 128);
        }
    }

    #[test]
    fn online_page_token_from_noise(token in prop_oneof![text(), "[A-Za-z0-9_-]{0,120}"], room in "[a-z]{0,3}") {
        let scope = Scope::parse(room).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let _ = OnlinePageToken::parse(&token, &scope);
    }

    #[test]
    fn page_tokens_from_checksummed_records(body in token_body(), room in "[a-z]{0,3}") {
        let token = checksummed_token(body);
        let scope = Scope::parse(room).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Ok(parsed) = OnlinePageToken::parse(&token, &scope) {
            // What it accepts, it gives back the same.
            let again = parsed.encode(&scope);
            if !again.is_empty() {
                prop_assert_eq!(OnlinePageToken::parse(&again, &scope), Ok(parsed));
            }
        }
        for by_users in [false, true] {
            if let Ok(Some(parsed)) = RoomsPageToken::parse(&token, by_users) {
                prop_assert_eq!(RoomsPageToken::parse(&parsed.encode(), by_users), Ok(Some(parsed)));
            }
        }
    }

    #[test]
    fn rooms_page_token_from_noise(token in prop_oneof![text(), "[A-Za-z0-9_-]{0,120}"], by_users: bool) {
        let _ = RoomsPageToken::parse(&token, by_users);
    }

    #[test]
    fn grpc_timeout_header(value in prop_oneof!["[0-9]{0,10}[HMSmun]?", text()]) {
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Ok(value) = value.parse() {
            metadata.insert("grpc-timeout", value);
        }
        if let Some(deadline) = crate::service::deadline_of(&metadata) {
            // At most 8 digits of hours: never beyond about 11,400 years.
            prop_assert!(deadline > tokio::time::Instant::now() - Duration::from_secs(1));
        }
    }

    #[test]
    fn bearer_header(value in prop::collection::vec(any::<u8>(), 0..80)) {
        if let Some(token) = auth::bearer(&value) {
            prop_assert!(!token.is_empty());
            prop_assert!(value.len() >= 7 + token.len());
        }
    }

    #[test]
    fn token_file(lines in prop::collection::vec(token_line(), 0..8), crlf: bool) {
        let text = lines.join(if crlf { "\r\n" } else { "\n" });
        match Tokens::parse(text.as_bytes()) {
            Ok(tokens) => {
                // Every token line is found with its role.
                for line in text.lines() {
                    let line = line.trim();
                    let mut words = line.split_ascii_whitespace();
                    if let (Some(role), Some(token)) = (words.next(), words.next()) {
                        if role.starts_with('#') {
                            continue;
                        }
                        let want = if role == "read" { auth::Role::Read } else { auth::Role::Report };
                        prop_assert_eq!(tokens.role_of(token.as_bytes()), Some(want));
                    }
                }
            }
            Err(error) => {
                // Never a word of the file in the message: any could be a token.
                let message = error.to_string();
                for word in text.split_ascii_whitespace().filter(|w| w.len() >= 12) {
                    prop_assert!(!message.contains(word), "{:?} quoted in {:?}", word, message);
                }
            }
        }
    }

    #[test]
    fn settings(pairs in prop::collection::vec(setting(), 0..5)) {
        let args = std::iter::once("presence".to_owned()).chain(pairs.into_iter().flatten());
        match Settings::try_from_args(args) {
            Ok(settings) => {
                let shown = format!("{settings:?}");
                prop_assert!(!shown.contains("hunter2"), "a password in {:?}", shown);
            }
            Err(error) => {
                let message = error.render().to_string();
                prop_assert!(!message.contains("hunter2"), "a password in {:?}", message);
            }
        }
    }
}
