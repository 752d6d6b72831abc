//! Owns who the client is: the peer address, or the address a trusted proxy vouches for in
//! `X-Forwarded-For`. Headers from anyone else are ignored, so the address in the usage
//! log and in anomaly detection cannot be spoofed.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderValue};
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

fn forwarded_chain(headers: &HeaderMap) -> impl DoubleEndedIterator<Item = &str> {
    headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The client's address: the right-most address of the chain that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical_ip(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    for entry in forwarded_chain(headers).rev() {
        match entry.parse::<IpAddr>() {
            Ok(ip) => {
                client = canonical_ip(ip);
                if !is_trusted(client, trusted) {
                    break;
                }
            }
            // A garbled hop: trust nothing further left of it.
            Err(_) => break,
        }
    }
    client
}

/// The `X-Forwarded-For` to send upstream: the trusted chain plus the peer, or just the peer.
pub fn forwarded_for(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> HeaderValue {
    let peer = canonical_ip(peer);
    if is_trusted(peer, trusted) {
        let chain: Vec<&str> = forwarded_chain(headers).filter(|s| !s.is_empty()).collect();
        if !chain.is_empty() {
            let value = format!("{}, {peer}", chain.join(", "));
            if let Ok(v) = HeaderValue::from_str(&value) {
                return v;
            }
        }
    }
    HeaderValue::from_str(&peer.to_string()).expect("an IP address is a valid header value")
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
}
