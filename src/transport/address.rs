//! Who a connection comes from: the client address believed through trusted proxies
//! (`Forwarded`, then `X-Forwarded-For`, read from the right), and the key that per-address
//! limits count it under (an IPv6 client by its /64, since one host is handed a whole /64).
//! Pure functions of the request's peer address and headers.

use actix_web::http::header::HeaderMap;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv6Addr};

/// The proxies whose word about the client's address is taken.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses CIDRs (`10.0.0.0/8`, `fd00::/8`) or single addresses.
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, String> {
        entries
            .iter()
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("'{entry}' is not a CIDR like 10.0.0.0/8 or an address"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer itself unless the peer is a trusted proxy; then the
    /// nearest address in the forwarding chain that is not a trusted proxy (a client can put
    /// anything at the left of the chain, so it is read from the right). A chain made only of
    /// trusted proxies gives its leftmost; an unreadable entry gives the proxy that wrote it.
    pub fn client_of(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return canonical(peer);
        }
        let chain = forwarded_chain(headers);
        let mut client = canonical(peer);
        for hop in chain.iter().rev() {
            let Some(ip) = hop else {
                break;
            };
            client = canonical(*ip);
            if !self.trusts(client) {
                break;
            }
        }
        client
    }
}

/// The `for=` addresses of the `Forwarded` headers (RFC 7239), or when there are none the
/// `X-Forwarded-For` list, left to right; `None` for an entry that is not an address
/// (`unknown`, an obfuscated `_name`).
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<Option<IpAddr>> = headers
        .get_all("forwarded")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                key.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| parse_node(value.trim().trim_matches('"')))
            })
        })
        .collect();
    if !forwarded.is_empty() {
        return forwarded;
    }
    headers
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|entry| parse_node(entry.trim()))
        .collect()
}

/// An address with or without a port: `192.0.2.1`, `192.0.2.1:443`, `[2001:db8::1]:443`,
/// `[2001:db8::1]`, `2001:db8::1`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest
            .split_once(']')?
            .0
            .parse::<Ipv6Addr>()
            .ok()
            .map(IpAddr::V6);
    }
    node.rsplit_once(':')?
        .0
        .parse::<std::net::Ipv4Addr>()
        .ok()
        .map(IpAddr::V4)
}

/// An IPv4 address that arrived as IPv4-mapped IPv6 is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What per-address limits count a client under: an IPv4 address itself, an IPv6 address by
/// its /64 (a host typically holds a whole /64 and could otherwise take a fresh limit with
/// every address in it).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            limit_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            limit_key(ip("2001:db8:1:2::7"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:3::1")),
            limit_key(ip("2001:db8:1:2::1"))
        );
        assert_eq!(limit_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(limit_key(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into(), "fd00::1".into()]).unwrap();
        let chain = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.1.1.1")]);
        // Directly connected: the headers are the client's own words.
        assert_eq!(
            proxies.client_of(ip("198.51.100.4"), &chain),
            ip("198.51.100.4")
        );
        // Through the proxies: the first untrusted hop from the right, not the forged left.
        assert_eq!(proxies.client_of(ip("10.0.0.2"), &chain), ip("203.0.113.9"));
        assert_eq!(proxies.client_of(ip("fd00::1"), &chain), ip("203.0.113.9"));
        let only_proxies = headers(&[("x-forwarded-for", "10.9.9.9")]);
        assert_eq!(
            proxies.client_of(ip("10.0.0.2"), &only_proxies),
            ip("10.9.9.9")
        );
        let nothing = headers(&[]);
        assert_eq!(proxies.client_of(ip("10.0.0.2"), &nothing), ip("10.0.0.2"));
        let unreadable = headers(&[("x-forwarded-for", "203.0.113.9, unknown")]);
        assert_eq!(
            proxies.client_of(ip("10.0.0.2"), &unreadable),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn the_forwarded_header_comes_first_in_all_its_forms() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into()]).unwrap();
        let both = headers(&[
            (
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8::5]:4711\";proto=https",
            ),
            ("forwarded", "For=10.2.2.2:80;by=10.0.0.1"),
            ("x-forwarded-for", "192.0.2.200"),
        ]);
        assert_eq!(proxies.client_of(ip("10.0.0.2"), &both), ip("2001:db8::5"));
        let v4_port = headers(&[("forwarded", "for=192.0.2.60:8080")]);
        assert_eq!(
            proxies.client_of(ip("10.0.0.2"), &v4_port),
            ip("192.0.2.60")
        );
    }

    #[test]
    fn bad_proxy_entries_are_named() {
        let error = TrustedProxies::parse(&["10.0.0.0/33".into()]).unwrap_err();
        assert!(error.contains("10.0.0.0/33"), "{error}");
        assert!(TrustedProxies::parse(&["::1".into(), "192.168.0.0/16".into()]).is_ok());
    }
}
