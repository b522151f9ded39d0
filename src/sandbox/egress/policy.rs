//! What the proxy lets through: the profile's destinations by host, port and protocol, names
//! resolved by the supervisor, and the public-address check that keeps a name from reaching
//! loopback or private space.

use super::*;

/// What the proxy lets through, from the profile and the host configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub profile: String,
    pub destinations: Vec<Destination>,
    /// Bytes per second in each direction, shared by all of the sandbox's connections.
    pub bytes_per_sec: Option<u64>,
    /// Names the operator mapped to addresses (`[sandbox.hosts]`): used instead of DNS, and
    /// exempt from the public-address check.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
}

pub(super) fn protocol_name(p: Option<Protocol>) -> &'static str {
    match p {
        None => "any",
        Some(Protocol::Tcp) => "TCP",
        Some(Protocol::Udp) => "UDP",
        Some(Protocol::Http) => "HTTP",
        Some(Protocol::Https) => "HTTPS",
    }
}

impl Policy {
    /// The destination entry that allows `host:port` by `kind`, or why none does.
    pub(super) fn allow(&self, host: &str, port: u16, kind: Kind) -> Result<&Destination, Refusal> {
        let named: Vec<&Destination> = self
            .destinations
            .iter()
            .filter(|d| same_host(&normalize_host(&d.host), host))
            .collect();
        if named.is_empty() {
            return Err(refuse(
                403,
                format!("{host} is not in network.allowed_destinations"),
            ));
        }
        let port_ok = |d: &Destination| match (d.port, d.protocol) {
            (Some(p), _) => p == port,
            (None, Some(Protocol::Https)) => port == 443,
            (None, Some(Protocol::Http)) => port == 80,
            (None, None) => port == 80 || port == 443,
            (None, _) => false,
        };
        let kind_ok = |d: &Destination| match d.protocol {
            None => true,
            Some(Protocol::Https | Protocol::Tcp) => kind == Kind::Connect,
            Some(Protocol::Http) => kind == Kind::Http,
            Some(Protocol::Udp) => false,
        };
        let with_port: Vec<&&Destination> = named.iter().filter(|d| port_ok(d)).collect();
        if with_port.is_empty() {
            return Err(refuse(
                403,
                format!("port {port} is not allowed for {host}"),
            ));
        }
        with_port
            .iter()
            .find(|d| kind_ok(d))
            .map(|d| **d)
            .ok_or_else(|| {
                let d = with_port[0];
                refuse(
                    403,
                    format!(
                        "{host}:{port} is allowed for {} only, not {}",
                        protocol_name(d.protocol),
                        match kind {
                            Kind::Connect => "CONNECT tunnels",
                            Kind::Http => "plain HTTP",
                        }
                    ),
                )
            })
    }

    /// Addresses to try for an allowed host. IP literals are used as given (they were listed
    /// literally); mapped names use their mapping; other names go to the system resolver and
    /// must resolve to public addresses.
    pub(super) fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(ips) = self.hosts.get(host) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        let found: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map_err(|e| refuse(502, format!("cannot resolve {host}: {e}")))?
            .collect();
        let public: Vec<SocketAddr> = found
            .iter()
            .copied()
            .filter(|a| is_public(a.ip()))
            .collect();
        if public.is_empty() {
            return Err(refuse(
                403,
                format!(
                    "{host} resolves only to non-public addresses ({}); map it in [sandbox.hosts] to allow that",
                    found
                        .iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok(public)
    }
}

/// A global unicast address: not loopback, private, link-local, shared, multicast,
/// documentation, reserved, or a transition form that embeds one of those.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 192 && b == 88 && c == 99)
                || (a == 198 && (b == 18 || b == 19)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // Only 2000::/3 is global unicast; within it, documentation (2001:db8::/32,
            // 3fff::/20), Teredo and other IETF protocol assignments (2001::/23) and 6to4
            // (2002::/16, which embeds an IPv4 address) are refused too.
            (s[0] & 0xe000) == 0x2000
                && !(s[0] == 0x2001 && s[1] == 0x0db8)
                && !(s[0] == 0x3fff && s[1] < 0x1000)
                && !(s[0] == 0x2001 && s[1] < 0x0200)
                && s[0] != 0x2002
        }
    }
}
