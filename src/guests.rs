//! How guests' addresses are kept (`PRESENCE_GUEST_ADDRESSES`): as they
//! are, truncated to their network, or as a keyed hash.
//!
//! The mode applies wherever a guest address comes in (`ReportGuest`,
//! `ReportBatch`, `CheckOnline`, `Leave`), so a check or a leave finds what
//! a report stored, and what `ListOnline` and `CheckOnline` return is the
//! stored form. Each mode is a function of the canonical address alone (and
//! of the key, the same on every replica), so one guest is one stored
//! value on every replica, and counts are exact counts of distinct stored
//! values: of networks when truncated, of addresses when hashed.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use ring::hmac;

use crate::domain::{GuestAddress, GuestAddressError};
use crate::settings::SettingError;

/// How much of an address `truncated` keeps, as analytics tools do.
pub const IPV4_PREFIX: u32 = 24;
pub const IPV6_PREFIX: u32 = 48;

/// The shortest hash key accepted, in bytes (after trimming whitespace).
pub const MIN_KEY_BYTES: usize = 32;

const KEY_SETTING: (&str, &str) = ("--guest-hash-key-file", "PRESENCE_GUEST_HASH_KEY_FILE");

/// The setting's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum GuestAddressMode {
    /// The address itself.
    #[default]
    Plain,
    /// The /24 of IPv4, the /48 of IPv6: the network's address.
    Truncated,
    /// HMAC-SHA-256 of the address, keyed with PRESENCE_GUEST_HASH_KEY_FILE.
    Hashed,
}

/// The mode, ready to apply: with its key when hashed.
#[derive(Clone)]
pub enum GuestPrivacy {
    Plain,
    Truncated,
    Hashed(hmac::Key),
}

impl fmt::Debug for GuestPrivacy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl GuestPrivacy {
    /// The mode of the settings; `hashed` reads its key from the file.
    pub fn new(mode: GuestAddressMode, key_file: Option<&Path>) -> Result<Self, SettingError> {
        let setting = |reason: String| SettingError::new(KEY_SETTING.0, KEY_SETTING.1, reason);
        match (mode, key_file) {
            (GuestAddressMode::Hashed, None) => Err(setting(
                "is needed with --guest-addresses hashed (PRESENCE_GUEST_ADDRESSES=hashed)".to_owned(),
            )),
            (GuestAddressMode::Hashed, Some(path)) => {
                let content =
                    std::fs::read(path).map_err(|e| setting(format!("cannot read {}: {e}", path.display())))?;
                let key = content.trim_ascii();
                if key.len() < MIN_KEY_BYTES {
                    return Err(setting(format!(
                        "{}: the key is {} bytes; at least {MIN_KEY_BYTES} are needed \
                         (make one with `openssl rand -hex 32`)",
                        path.display(),
                        key.len()
                    )));
                }
                Ok(GuestPrivacy::Hashed(hmac::Key::new(hmac::HMAC_SHA256, key)))
            }
            (_, Some(_)) => Err(setting(
                "is used only with --guest-addresses hashed (PRESENCE_GUEST_ADDRESSES=hashed)".to_owned(),
            )),
            (GuestAddressMode::Plain, None) => Ok(GuestPrivacy::Plain),
            (GuestAddressMode::Truncated, None) => Ok(GuestPrivacy::Truncated),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            GuestPrivacy::Plain => "plain",
            GuestPrivacy::Truncated => "truncated",
            GuestPrivacy::Hashed(_) => "hashed",
        }
    }

    /// A guest address from a client, in the form it is stored in.
    pub fn parse(&self, text: &str) -> Result<GuestAddress, GuestAddressError> {
        let address = GuestAddress::parse_ip(text)?;
        Ok(match self {
            GuestPrivacy::Plain => GuestAddress::from(address),
            GuestPrivacy::Truncated => GuestAddress::from(network(address)),
            GuestPrivacy::Hashed(key) => {
                let canonical = GuestAddress::from(address);
                GuestAddress::pseudonym(hmac::sign(key, canonical.as_str().as_bytes()).as_ref())
            }
        })
    }
}

/// The address of the network an address is in: its /24 (IPv4) or /48
/// (IPv6).
pub fn network(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from_bits(v4.to_bits() & (u32::MAX << (32 - IPV4_PREFIX)))),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & (u128::MAX << (128 - IPV6_PREFIX)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hashed() -> GuestPrivacy {
        GuestPrivacy::Hashed(hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]))
    }

    fn stored(mode: &GuestPrivacy, text: &str) -> String {
        mode.parse(text).expect("an address").as_str().to_owned()
    }

    #[test]
    fn truncated_keeps_the_network_address_in_canonical_form() {
        let mode = GuestPrivacy::Truncated;
        assert_eq!(stored(&mode, "203.0.113.77"), "203.0.113.0");
        assert_eq!(stored(&mode, "::ffff:203.0.113.77"), "203.0.113.0");
        assert_eq!(stored(&mode, "2001:db8:85a3:8d3:1319:8a2e:370:7348"), "2001:db8:85a3::");
        assert_eq!(stored(&mode, "2001:DB8:85A3::1"), "2001:db8:85a3::");
        assert_eq!(stored(&mode, "::1"), "::");
    }

    #[test]
    fn hashed_is_hmac_sha256_of_the_canonical_address_in_lowercase_hex() {
        let mode = hashed();
        let value = stored(&mode, "10.0.0.1");
        assert_eq!(value.len(), 64);
        assert!(value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        // One guest, whatever its spelling, is one value.
        assert_eq!(stored(&mode, "::ffff:10.0.0.1"), value);
        assert_ne!(stored(&mode, "10.0.0.2"), value);
        // The HMAC of the canonical text, computed directly.
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]);
        let expected = GuestAddress::pseudonym(hmac::sign(&key, b"10.0.0.1").as_ref());
        assert_eq!(value, expected.as_str());
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        let tag = GuestAddress::pseudonym(hmac::sign(&key, b"what do ya want for nothing?").as_ref());
        assert_eq!(
            tag.as_str(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn plain_is_the_canonical_address() {
        assert_eq!(stored(&GuestPrivacy::Plain, "2001:DB8::0:1"), "2001:db8::1");
    }

    #[test]
    fn every_mode_refuses_what_is_not_an_address() {
        for mode in [GuestPrivacy::Plain, GuestPrivacy::Truncated, hashed()] {
            assert_eq!(mode.parse("1.2.3.4:80"), Err(GuestAddressError::NotAnAddress));
            assert_eq!(mode.parse(""), Err(GuestAddressError::Empty));
        }
    }

    #[test]
    fn a_short_or_missing_key_is_refused_naming_the_setting_without_quoting_it() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("key");
        std::fs::write(&path, "  short-secret-key \n").expect("written");
        let error = GuestPrivacy::new(GuestAddressMode::Hashed, Some(&path)).expect_err("too short");
        let text = error.to_string();
        assert!(
            text.contains("PRESENCE_GUEST_HASH_KEY_FILE") && text.contains("16 bytes"),
            "{text}"
        );
        assert!(!text.contains("short-secret-key"), "{text}");
        assert!(GuestPrivacy::new(GuestAddressMode::Hashed, None).is_err());
        assert!(GuestPrivacy::new(GuestAddressMode::Truncated, Some(&path)).is_err());
        std::fs::write(&path, format!("\n{}\n", "k".repeat(32))).expect("written");
        let mode = GuestPrivacy::new(GuestAddressMode::Hashed, Some(&path)).expect("32 bytes after trimming");
        assert_eq!(mode.name(), "hashed");
        assert_eq!(format!("{mode:?}"), "hashed");
    }

    proptest! {
        #[test]
        fn a_truncated_ipv4_address_is_its_slash_24(bits: u32) {
            let address = Ipv4Addr::from_bits(bits);
            let [a, b, c, _] = address.octets();
            prop_assert_eq!(stored(&GuestPrivacy::Truncated, &address.to_string()), format!("{a}.{b}.{c}.0"));
        }

        #[test]
        fn a_truncated_ipv6_address_keeps_its_first_48_bits(bits: u128) {
            let address = Ipv6Addr::from_bits(bits);
            let value = stored(&GuestPrivacy::Truncated, &address.to_string());
            let back: IpAddr = value.parse().map_err(|_| TestCaseError::fail("not an address"))?;
            match back {
                // An IPv4-mapped address is stored as IPv4.
                IpAddr::V4(v4) => prop_assert!(address.to_ipv4_mapped().is_some() && v4.octets()[3] == 0),
                IpAddr::V6(v6) => prop_assert_eq!(v6.to_bits(), bits & (u128::MAX << 80)),
            }
        }
    }
}
