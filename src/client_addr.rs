//! Owns who the client is: the peer address, or the address a trusted proxy vouches for in
//! `X-Forwarded-For` (or, when a proxy sends only that, RFC 7239 `Forwarded: for=`).
//! Headers from anyone else are ignored, so the address in the usage log and in anomaly
//! detection cannot be spoofed.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderValue};
use ipnet::IpNet;

pub const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = canonical_ip(ip);
    trusted.iter().any(|net| net.contains(&ip))
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are their IPv4 address.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One hop as a proxy wrote it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
/// `[2001:db8::1]:443`, quoted or not. `None` for anything else (`unknown`, an obfuscated
/// `_node`, garbage): no address left of such a hop is believed.
fn parse_hop(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(canonical_ip(ip));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(canonical_ip(addr.ip()));
    }
    text.strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.parse::<IpAddr>().ok())
        .map(canonical_ip)
}

/// The addresses a request claims passed through, origin first: `X-Forwarded-For` when
/// present, otherwise the `for=` of each `Forwarded` element.
fn claimed_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let values = |name| {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("\0"))
    };
    if headers.contains_key(&X_FORWARDED_FOR) {
        return values(X_FORWARDED_FOR)
            .flat_map(|v| v.split(','))
            .map(parse_hop)
            .collect();
    }
    values(header::FORWARDED)
        .flat_map(|v| v.split(','))
        .map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                key.trim().eq_ignore_ascii_case("for").then_some(value)
            })
        })
        .map(|value| value.and_then(parse_hop))
        .collect()
}

/// The client's address: the right-most address of the chain that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical_ip(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    for hop in claimed_chain(headers).into_iter().rev() {
        match hop {
            Some(ip) => {
                client = ip;
                if !is_trusted(client, trusted) {
                    break;
                }
            }
            // A garbled hop: trust nothing further left of it.
            None => break,
        }
    }
    client
}

/// The `X-Forwarded-For` to send upstream: the trusted proxy's chain (each hop an address
/// or `unknown`) plus the peer, or just the peer.
pub fn forwarded_for(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> HeaderValue {
    let peer = canonical_ip(peer);
    if !is_trusted(peer, trusted) {
        return peer_only(peer);
    }
    let mut value = String::new();
    for hop in claimed_chain(headers) {
        match hop {
            Some(ip) => value.push_str(&ip.to_string()),
            None => value.push_str("unknown"),
        }
        value.push_str(", ");
    }
    value.push_str(&peer.to_string());
    HeaderValue::from_str(&value).expect("addresses and commas are a valid header value")
}

thread_local! {
    /// The last untrusted peer's `X-Forwarded-For` on this thread. Requests come in runs
    /// from one address (a connection's, a load balancer's), and formatting the address
    /// for each of them showed in profiles.
    static LAST_PEER: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

fn peer_only(peer: IpAddr) -> HeaderValue {
    LAST_PEER.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((ip, value)) if *ip == peer => value.clone(),
            _ => {
                let value = HeaderValue::from_str(&peer.to_string())
                    .expect("an address is a valid header value");
                *last = Some((peer, value.clone()));
                value
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_str(xff).unwrap());
        h
    }

    #[test]
    fn untrusted_peers_cannot_spoof() {
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers("1.2.3.4");
        assert_eq!(client_ip(peer, &h, &trusted), peer);
        assert_eq!(forwarded_for(peer, &h, &trusted), "203.0.113.9");
    }

    #[test]
    fn trusted_proxies_are_walked_from_the_right() {
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers("6.6.6.6, 198.51.100.7, 10.0.0.1");
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            forwarded_for(peer, &h, &trusted),
            "6.6.6.6, 198.51.100.7, 10.0.0.1, 10.0.0.2"
        );
    }

    #[test]
    fn hops_with_ports_brackets_and_garbage() {
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let cases = [
            ("198.51.100.7:4711, 10.0.0.1", "198.51.100.7"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("::ffff:198.51.100.7", "198.51.100.7"),
            ("6.6.6.6, garbage, 10.0.0.1", "10.0.0.1"),
            ("6.6.6.6, , 10.0.0.1", "10.0.0.1"),
            ("", "10.0.0.2"),
        ];
        for (xff, want) in cases {
            assert_eq!(
                client_ip(peer, &headers(xff), &trusted),
                want.parse::<IpAddr>().unwrap(),
                "{xff}"
            );
        }
        assert_eq!(
            forwarded_for(peer, &headers("6.6.6.6, garbage"), &trusted),
            "6.6.6.6, unknown, 10.0.0.2"
        );
    }

    #[test]
    fn rfc7239_forwarded_is_read_only_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert(
            header::FORWARDED,
            HeaderValue::from_static(
                "for=192.0.2.60;proto=http;by=203.0.113.43, For=\"[2001:db8:cafe::17]:4711\"",
            ),
        );
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "2001:db8:cafe::17".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            forwarded_for(proxy, &h, &trusted),
            "192.0.2.60, 2001:db8:cafe::17, 10.0.0.2"
        );
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_ip(stranger, &h, &trusted), stranger);
        assert_eq!(forwarded_for(stranger, &h, &trusted), "203.0.113.9");
    }
}
