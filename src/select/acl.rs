//! Pen's access lists: ten numbered lists of permit/deny entries, checked for
//! connecting clients (`client_acl`), per server (`server N acl A`) and for
//! the control port (`control_acl`).
//!
//! Semantics (Pen's `acl.c`): the first matching entry decides; when none
//! matches, the answer is the opposite of the last entry's verdict; an empty
//! list permits. IPv4 entries never match IPv6 clients and the reverse. Unix
//! socket clients are always permitted.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One entry of an access list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclEntry {
    /// `acl N permit|deny a.b.c.d [mask]`: matches when `client & mask == addr`.
    V4 {
        permit: bool,
        addr: Ipv4Addr,
        mask: Ipv4Addr,
    },
    /// `acl N permit|deny addr6[/len]`.
    V6 { permit: bool, addr: Ipv6Addr, len: u8 },
}

impl AclEntry {
    pub fn permit(&self) -> bool {
        match *self {
            AclEntry::V4 { permit, .. } | AclEntry::V6 { permit, .. } => permit,
        }
    }

    fn matches(&self, client: IpAddr) -> bool {
        match (*self, client) {
            (AclEntry::V4 { addr, mask, .. }, IpAddr::V4(ip)) => {
                u32::from(ip) & u32::from(mask) == u32::from(addr)
            }
            (AclEntry::V6 { addr, len, .. }, IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len.min(128))).unwrap_or(0);
                u128::from(ip) & mask == u128::from(addr) & mask
            }
            _ => false,
        }
    }
}

/// Pen's `write` format of an entry (without the `acl N ` prefix).
impl fmt::Display for AclEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.permit() { "permit" } else { "deny" };
        match self {
            AclEntry::V4 { addr, mask, .. } => write!(f, "{verdict} {addr} {mask}"),
            AclEntry::V6 { addr, len, .. } => write!(f, "{verdict} {addr}/{len}"),
        }
    }
}

/// Whether `list` lets `client` in (`None`: a Unix socket client).
pub fn permits(list: &[AclEntry], client: Option<IpAddr>) -> bool {
    let Some(client) = client else {
        return true;
    };
    if let Some(entry) = list.iter().find(|e| e.matches(client)) {
        return entry.permit();
    }
    list.last().is_none_or(|last| !last.permit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(permit: bool, addr: &str, mask: &str) -> AclEntry {
        AclEntry::V4 {
            permit,
            addr: addr.parse().unwrap(),
            mask: mask.parse().unwrap(),
        }
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn an_empty_list_permits_everyone() {
        assert!(permits(&[], ip("10.1.2.3")));
        assert!(permits(&[], ip("::1")));
    }

    #[test]
    fn the_first_match_decides() {
        let list = [
            v4(false, "10.0.0.5", "255.255.255.255"),
            v4(true, "10.0.0.0", "255.0.0.0"),
        ];
        assert!(!permits(&list, ip("10.0.0.5")));
        assert!(permits(&list, ip("10.9.9.9")));
    }

    #[test]
    fn no_match_is_the_opposite_of_the_last_entry() {
        let permit_only = [v4(true, "127.0.0.2", "255.255.255.255")];
        assert!(permits(&permit_only, ip("127.0.0.2")));
        assert!(!permits(&permit_only, ip("127.0.0.3")));
        let deny_only = [v4(false, "127.0.0.2", "255.255.255.255")];
        assert!(permits(&deny_only, ip("127.0.0.3")));
    }

    #[test]
    fn families_do_not_mix_and_unix_clients_pass() {
        let list = [v4(true, "0.0.0.0", "0.0.0.0")];
        assert!(!permits(&list, ip("::1")), "an IPv4 entry does not match IPv6");
        assert!(permits(&list, None));
    }

    #[test]
    fn ipv6_prefixes() {
        let list = [AclEntry::V6 {
            permit: false,
            addr: "fd00::".parse().unwrap(),
            len: 8,
        }];
        assert!(!permits(&list, ip("fd12::1")));
        assert!(permits(&list, ip("fe80::1")));
        let host = [AclEntry::V6 {
            permit: true,
            addr: "::1".parse().unwrap(),
            len: 128,
        }];
        assert!(permits(&host, ip("::1")));
        assert!(!permits(&host, ip("::2")));
        let all = [AclEntry::V6 {
            permit: true,
            addr: "::".parse().unwrap(),
            len: 0,
        }];
        assert!(permits(&all, ip("2001:db8::1")));
    }

    #[test]
    fn display_is_pens_write_format() {
        assert_eq!(
            v4(true, "10.0.0.0", "255.0.0.0").to_string(),
            "permit 10.0.0.0 255.0.0.0"
        );
        let e = AclEntry::V6 {
            permit: false,
            addr: "fd00::".parse().unwrap(),
            len: 8,
        };
        assert_eq!(e.to_string(), "deny fd00::/8");
    }
}
