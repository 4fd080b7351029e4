use std::{fmt, net::IpAddr, str::FromStr};

/// An anonymous guest, known by IP address, in canonical text form.
///
/// The same guest must always be stored as the same string, or it would be
/// counted twice: IPv4 is a dotted quad, IPv6 is RFC 5952 text (lower case,
/// the longest run of zeros compressed), and an IPv4-mapped IPv6 address
/// (`::ffff:10.0.0.1`, what a dual-stack socket reports) is its IPv4 address.
///
/// Where the address itself must not be kept (`PRESENCE_GUEST_ADDRESSES`,
/// see `guests`), a guest is its network's address, still an address, or
/// a [pseudonym](GuestAddress::pseudonym): a keyed digest in hex.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestAddress(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestAddressError {
    #[error("must not be empty")]
    Empty,
    #[error("must be an IPv4 or IPv6 address without a port")]
    NotAnAddress,
}

impl GuestAddress {
    pub fn parse(text: &str) -> Result<Self, GuestAddressError> {
        Self::parse_ip(text).map(Self::from)
    }

    /// The address, canonical (an IPv4-mapped IPv6 address is its IPv4
    /// address), before it is given a stored form.
    pub fn parse_ip(text: &str) -> Result<IpAddr, GuestAddressError> {
        if text.is_empty() {
            return Err(GuestAddressError::Empty);
        }
        let address = IpAddr::from_str(text).map_err(|_| GuestAddressError::NotAnAddress)?;
        Ok(address.to_canonical())
    }

    /// A guest known by a digest of its address (lowercase hex) instead of
    /// the address.
    pub fn pseudonym(digest: &[u8]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(digest.len() * 2);
        for byte in digest {
            text.push(char::from(HEX[usize::from(byte >> 4)]));
            text.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<IpAddr> for GuestAddress {
    fn from(address: IpAddr) -> Self {
        // std's `Display` for IPv6 follows RFC 5952.
        Self(address.to_canonical().to_string())
    }
}

impl AsRef<str> for GuestAddress {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GuestAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn canonical(text: &str) -> Result<String, GuestAddressError> {
        GuestAddress::parse(text).map(|a| a.to_string())
    }

    #[test]
    fn addresses_are_stored_in_canonical_form() {
        let cases = [
            ("10.0.0.1", "10.0.0.1"),
            ("255.255.255.255", "255.255.255.255"),
            ("::1", "::1"),
            ("2001:DB8::1", "2001:db8::1"),
            ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
            ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
            ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),
            ("fe80:0:0:0:0:0:0:0", "fe80::"),
        ];
        for (given, stored) in cases {
            assert_eq!(canonical(given), Ok(stored.to_owned()), "{given}");
        }
    }

    #[test]
    fn an_ipv4_mapped_ipv6_address_is_the_ipv4_address() {
        assert_eq!(canonical("::ffff:10.0.0.1"), Ok("10.0.0.1".to_owned()));
        assert_eq!(canonical("::FFFF:a00:1"), Ok("10.0.0.1".to_owned()));
    }

    #[test]
    fn a_pseudonym_is_the_digest_in_lowercase_hex() {
        assert_eq!(GuestAddress::pseudonym(&[0x00, 0x9f, 0xa0, 0xff]).as_str(), "009fa0ff");
    }

    #[test]
    fn an_empty_address_is_rejected() {
        assert_eq!(canonical(""), Err(GuestAddressError::Empty));
    }

    #[test]
    fn things_that_are_not_addresses_are_rejected() {
        let cases = [
            "1.2.3.4:80",
            "[::1]:80",
            "[::1]",
            "localhost",
            "1.2.3",
            "256.1.1.1",
            "01.2.3.4",
            " 10.0.0.1",
            "10.0.0.1 ",
            "fe80::1%eth0",
            "1.2.3.4/32",
            "::g",
        ];
        for text in cases {
            assert_eq!(canonical(text), Err(GuestAddressError::NotAnAddress), "{text:?}");
        }
    }

    proptest! {
        #[test]
        fn every_ipv4_address_is_its_own_dotted_quad(bits: u32) {
            let address = Ipv4Addr::from(bits);
            prop_assert_eq!(canonical(&address.to_string()), Ok(address.to_string()));
            prop_assert_eq!(canonical(&address.to_ipv6_mapped().to_string()), Ok(address.to_string()));
        }

        #[test]
        fn canonical_form_is_stable_under_reparsing(bits: u128) {
            let first = canonical(&Ipv6Addr::from(bits).to_string()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(canonical(&first), Ok(first.clone()));
        }
    }
}
