//! Where a node may be: the one decision on every address a node registers
//! or is updated to.
//!
//! The router connects to whatever address a node names and relays the
//! answer, so an address is a request the router will make on the node's
//! behalf. An address is first brought to its canonical form (an
//! IPv4-mapped IPv6 address is the IPv4 address it maps), so that no
//! spelling gets past a check that its plain form would fail. Then refused:
//! addresses no server can be at (unspecified, multicast, broadcast,
//! reserved), link-local ones (169.254.169.254 is the cloud metadata
//! service), translated and tunnelled IPv6 forms that hide an IPv4 address,
//! and this router's own listening address (a request sent there would come
//! back to be forwarded again). Loopback and private ranges stay allowed:
//! that is where nodes live. An operator can narrow it further to given
//! networks (`--node-networks`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Why an address is refused; each says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressRefusal {
    #[error("{0} is unspecified (it names no machine): register the node's own address")]
    Unspecified(IpAddr),
    #[error("{0} is a multicast address, not a machine's: register the node's own address")]
    Multicast(IpAddr),
    #[error("{0} is the broadcast address, not a machine's: register the node's own address")]
    Broadcast(IpAddr),
    #[error("{0} is in a reserved range that no machine uses: register the node's own address")]
    Reserved(IpAddr),
    #[error("{0} is link-local (this includes the cloud metadata service at 169.254.169.254): register an address the router reaches through its network")]
    LinkLocal(IpAddr),
    #[error(
        "{ip} is a translated or tunnelled IPv6 form ({form}): register the address it stands for"
    )]
    Translated { ip: IpAddr, form: &'static str },
    #[error("{0} is this router's own address: requests to this node would come back to the router; register the LLM server's address and port")]
    ThisRouter(SocketAddr),
    #[error("{ip} is outside the networks nodes may be in (--node-networks {networks})")]
    OutsideNetworks { ip: IpAddr, networks: String },
}

/// The rules, fixed at start.
#[derive(Debug, Clone)]
pub struct NodeAddressPolicy {
    /// Where this router listens.
    listen: SocketAddr,
    /// This machine's own addresses, which reach the router when it listens
    /// on every interface.
    local_addresses: Vec<IpAddr>,
    /// When not empty, nodes must be in one of these.
    networks: Vec<IpNet>,
}

impl NodeAddressPolicy {
    pub fn new(listen: SocketAddr, local_addresses: Vec<IpAddr>, networks: Vec<IpNet>) -> Self {
        NodeAddressPolicy {
            listen,
            local_addresses: local_addresses.into_iter().map(canonical).collect(),
            networks,
        }
    }

    /// For a router listening at `listen` on this machine: its interface
    /// addresses are read now.
    pub fn for_this_machine(listen: SocketAddr, networks: Vec<IpNet>) -> Self {
        let local_addresses = nix::ifaddrs::getifaddrs()
            .map(|interfaces| {
                interfaces
                    .filter_map(|interface| interface.address)
                    .filter_map(|address| {
                        if let Some(v4) = address.as_sockaddr_in() {
                            Some(IpAddr::V4(v4.ip()))
                        } else {
                            address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self::new(listen, local_addresses, networks)
    }

    /// Allows no class the router refuses by default, and no network limit:
    /// for tests of the registry that have no listening socket.
    pub fn permissive_for_tests() -> Self {
        Self::new(SocketAddr::from(([0, 0, 0, 0], 0)), Vec::new(), Vec::new())
    }

    /// The canonical address when a node may be at `ip`:`port`.
    pub fn check(&self, ip: IpAddr, port: u16) -> Result<IpAddr, AddressRefusal> {
        let ip = canonical(ip);
        refuse_by_class(ip)?;
        if self.reaches_this_router(ip, port) {
            return Err(AddressRefusal::ThisRouter(SocketAddr::new(ip, port)));
        }
        if !self.networks.is_empty() && !self.networks.iter().any(|net| net.contains(&ip)) {
            return Err(AddressRefusal::OutsideNetworks {
                ip,
                networks: self
                    .networks
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            });
        }
        Ok(ip)
    }

    fn reaches_this_router(&self, ip: IpAddr, port: u16) -> bool {
        if port != self.listen.port() || self.listen.port() == 0 {
            return false;
        }
        let listen_ip = canonical(self.listen.ip());
        if listen_ip.is_unspecified() {
            // Every address of this machine leads here, loopback included.
            ip.is_loopback() || self.local_addresses.contains(&ip)
        } else {
            ip == listen_ip
        }
    }
}

/// One spelling per address: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
/// is the IPv4 address it maps, which is where a connection to it goes.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn refuse_by_class(ip: IpAddr) -> Result<(), AddressRefusal> {
    match ip {
        IpAddr::V4(v4) => refuse_v4(v4).map_err(|refusal| refusal(ip)),
        IpAddr::V6(v6) => refuse_v6(v6, ip),
    }
}

type Refusal = fn(IpAddr) -> AddressRefusal;

fn refuse_v4(ip: Ipv4Addr) -> Result<(), Refusal> {
    let [first, second, ..] = ip.octets();
    if ip.is_broadcast() {
        return Err(AddressRefusal::Broadcast);
    }
    // 0.0.0.0/8 is "this network": 0.0.0.0 itself, and no host.
    if first == 0 {
        return Err(AddressRefusal::Unspecified);
    }
    if ip.is_multicast() {
        return Err(AddressRefusal::Multicast);
    }
    // 240.0.0.0/4, reserved for future use.
    if first >= 240 {
        return Err(AddressRefusal::Reserved);
    }
    if first == 169 && second == 254 {
        return Err(AddressRefusal::LinkLocal);
    }
    Ok(())
}

fn refuse_v6(v6: Ipv6Addr, ip: IpAddr) -> Result<(), AddressRefusal> {
    let segments = v6.segments();
    if v6.is_unspecified() {
        return Err(AddressRefusal::Unspecified(ip));
    }
    if v6.is_multicast() {
        return Err(AddressRefusal::Multicast(ip));
    }
    // fe80::/10.
    if segments[0] & 0xffc0 == 0xfe80 {
        return Err(AddressRefusal::LinkLocal(ip));
    }
    // fec0::/10, site-local, deprecated and reserved.
    if segments[0] & 0xffc0 == 0xfec0 {
        return Err(AddressRefusal::Reserved(ip));
    }
    let translated = |form| Err(AddressRefusal::Translated { ip, form });
    // ::a.b.c.d, the deprecated IPv4-compatible form (:: and ::1 aside).
    if segments[..6] == [0; 6] && !v6.is_loopback() {
        return translated("IPv4-compatible, ::/96");
    }
    // 64:ff9b::/96 (well-known NAT64) and 64:ff9b:1::/48 (local NAT64).
    if segments[0] == 0x64 && segments[1] == 0xff9b {
        return translated("NAT64, 64:ff9b::/96 or 64:ff9b:1::/48");
    }
    // 2002::/16, 6to4.
    if segments[0] == 0x2002 {
        return translated("6to4, 2002::/16");
    }
    // 2001::/32, Teredo.
    if segments[0] == 0x2001 && segments[1] == 0 {
        return translated("Teredo, 2001::/32");
    }
    Ok(())
}

/// Parses `--node-networks`: CIDR networks, comma-separated.
pub fn parse_networks(text: &str) -> Result<Vec<IpNet>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.parse::<IpNet>()
                .or_else(|_| part.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| format!("{part:?} is not a network: write it as CIDR, such as 10.0.0.0/8 or fd00::/8"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an IP address")
    }

    /// A router listening on every interface at port 8080, on a machine
    /// whose only other address is 192.168.1.10 (never contacted: this is
    /// the deciding function alone).
    fn policy() -> NodeAddressPolicy {
        NodeAddressPolicy::new(
            SocketAddr::from(([0, 0, 0, 0], 8080)),
            vec![ip("127.0.0.1"), ip("192.168.1.10"), ip("::1")],
            Vec::new(),
        )
    }

    #[test]
    fn every_class_that_is_not_a_machine_is_refused_in_every_spelling() {
        let refused = [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("::ffff:255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("::ffff:224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("240.0.0.1", "reserved"),
            ("254.1.2.3", "reserved"),
            ("::ffff:240.0.0.1", "reserved"),
            ("fec0::1", "reserved"),
            ("169.254.169.254", "link-local"),
            ("::ffff:169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("::169.254.169.254", "translated"),
            ("::127.0.0.1", "translated"),
            ("64:ff9b::a9fe:a9fe", "translated"),
            ("64:ff9b:1::1", "translated"),
            ("2002:a9fe:a9fe::1", "translated"),
            ("2001:0:4136:e378::1", "translated"),
        ];
        for (text, class) in refused {
            let refusal = policy().check(ip(text), 11434).expect_err(text);
            let message = refusal.to_string();
            assert!(
                message.contains(class) || message.contains("IPv6 form"),
                "{text}: {message}"
            );
            assert!(
                message.contains("register"),
                "{text}: the message says what to do: {message}"
            );
        }
    }

    #[test]
    fn private_public_and_loopback_nodes_are_allowed_and_mapped_forms_canonicalised() {
        for (text, canonical_form) in [
            ("127.0.0.1", "127.0.0.1"),
            ("127.0.0.2", "127.0.0.2"),
            ("::1", "::1"),
            ("10.1.2.3", "10.1.2.3"),
            ("172.16.0.5", "172.16.0.5"),
            ("192.168.1.20", "192.168.1.20"),
            ("100.64.0.1", "100.64.0.1"),
            ("fd12:3456::1", "fd12:3456::1"),
            ("8.8.8.8", "8.8.8.8"),
            ("2606:4700::1111", "2606:4700::1111"),
            ("::ffff:10.1.2.3", "10.1.2.3"),
            ("::ffff:127.0.0.1", "127.0.0.1"),
        ] {
            assert_eq!(
                policy().check(ip(text), 11434),
                Ok(ip(canonical_form)),
                "{text}"
            );
        }
    }

    #[test]
    fn this_routers_own_address_is_refused() {
        // Listening on every interface: any address of this machine, on the
        // router's port, is the router.
        for text in [
            "127.0.0.1",
            "127.0.0.9",
            "::1",
            "::ffff:127.0.0.1",
            "192.168.1.10",
        ] {
            assert!(
                matches!(
                    policy().check(ip(text), 8080),
                    Err(AddressRefusal::ThisRouter(_))
                ),
                "{text}"
            );
        }
        assert!(
            policy().check(ip("192.168.1.11"), 8080).is_ok(),
            "another machine"
        );
        assert!(
            policy().check(ip("127.0.0.1"), 8081).is_ok(),
            "another port"
        );
        // Listening on one address: only that one.
        let bound = NodeAddressPolicy::new(
            SocketAddr::from(([127, 0, 0, 1], 8080)),
            vec![ip("127.0.0.1")],
            Vec::new(),
        );
        assert!(bound.check(ip("127.0.0.1"), 8080).is_err());
        assert!(bound.check(ip("127.0.0.2"), 8080).is_ok());
    }

    #[test]
    fn node_networks_narrow_where_nodes_may_be() {
        let networks = parse_networks("10.0.0.0/8, 127.0.0.0/8,fd00::/8").expect("networks");
        let narrow = NodeAddressPolicy::new(
            SocketAddr::from(([127, 0, 0, 1], 8080)),
            Vec::new(),
            networks,
        );
        assert!(narrow.check(ip("10.9.8.7"), 11434).is_ok());
        assert!(
            narrow.check(ip("::ffff:10.9.8.7"), 11434).is_ok(),
            "mapped form, same network"
        );
        assert!(narrow.check(ip("127.0.0.2"), 11434).is_ok());
        assert!(narrow.check(ip("fd00::7"), 11434).is_ok());
        let outside = narrow
            .check(ip("192.168.1.20"), 11434)
            .expect_err("outside");
        assert!(
            outside
                .to_string()
                .contains("--node-networks 10.0.0.0/8,127.0.0.0/8,fd00::/8"),
            "{outside}"
        );
        assert!(narrow.check(ip("8.8.8.8"), 11434).is_err());
        // A bare address is a one-address network; a host part is dropped.
        assert_eq!(
            parse_networks("10.1.2.3/8").expect("ok")[0].to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_networks("10.1.2.3").expect("ok")[0].to_string(),
            "10.1.2.3/32"
        );
        assert!(parse_networks("10.0.0.0/33").is_err());
        assert!(parse_networks("a-host")
            .expect_err("not a network")
            .contains("CIDR"));
    }
}
