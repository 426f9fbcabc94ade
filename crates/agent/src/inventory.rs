//! What the agent tells the console about its machine at enrollment: host name, operating
//! system, IP addresses with prefix lengths (so that the console can compute the subnet
//! broadcast for Wake-on-LAN) and the MAC addresses of its network cards.
//!
//! On Linux read from files only (no `getifaddrs`, no unsafe code): `/proc/net/fib_trie` and
//! `/proc/net/route` for IPv4, `/proc/net/if_inet6` for IPv6, `/sys/class/net/*` for MACs. On
//! Windows from the adapter list ([`crate::platform`]). Anything that cannot be read is left
//! out; the console accepts an inventory with gaps.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The console takes at most this many addresses and MACs.
pub(crate) const MAX_ADDRESSES: usize = 64;
pub(crate) const MAX_MACS: usize = 32;

/// One IP address with its prefix length.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InterfaceAddress {
    /// The address.
    pub address: IpAddr,
    /// The prefix length of its subnet (24 for a /24).
    pub prefix_len: u8,
}

/// The machine as the console records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Host name.
    pub hostname: String,
    /// Operating system, e.g. "Debian GNU/Linux 13 (trixie)".
    pub os: String,
    /// IP addresses (loopback and link-local left out).
    pub addresses: Vec<InterfaceAddress>,
    /// MAC addresses of Ethernet interfaces, `aa:bb:cc:dd:ee:ff`.
    pub macs: Vec<String>,
}

impl Inventory {
    /// Reads this machine's inventory (the way differs by system: [`crate::platform`]).
    pub fn gather() -> Self {
        crate::platform::gather_inventory()
    }

    /// Reads the inventory below `root` (`/` normally; a prepared folder in tests).
    pub fn gather_from(root: &Path) -> Self {
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
        let hostname = first_line(&read("proc/sys/kernel/hostname"))
            .or_else(|| first_line(&read("etc/hostname")))
            .unwrap_or_default();
        let os = os_name(&read("etc/os-release"))
            .or_else(|| os_name(&read("usr/lib/os-release")))
            .unwrap_or_else(|| std::env::consts::OS.to_owned());

        let mut with_address: BTreeSet<String> = BTreeSet::new();
        let mut addresses = Vec::new();
        let routes = ipv4_routes(&read("proc/net/route"));
        for ip in ipv4_local_addresses(&read("proc/net/fib_trie")) {
            if ip.is_loopback() || ip.is_link_local() || ip.is_unspecified() {
                continue;
            }
            // The interface's own subnet: the longest gateway-less route that holds it.
            let best = routes
                .iter()
                .filter(|r| r.contains(ip))
                .max_by_key(|r| r.prefix_len);
            let Some(route) = best else { continue };
            with_address.insert(route.iface.clone());
            addresses.push(InterfaceAddress {
                address: IpAddr::V4(ip),
                prefix_len: route.prefix_len,
            });
        }
        for (ip, prefix_len, iface) in ipv6_addresses(&read("proc/net/if_inet6")) {
            // fe80::/10 is link-local: useless to the console.
            if ip.is_loopback() || (ip.segments()[0] & 0xffc0) == 0xfe80 {
                continue;
            }
            with_address.insert(iface);
            addresses.push(InterfaceAddress {
                address: IpAddr::V6(ip),
                prefix_len,
            });
        }
        addresses.sort();
        addresses.dedup();
        addresses.truncate(MAX_ADDRESSES);

        let mut macs = BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(root.join("sys/class/net")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let dir = entry.path();
                let link_type = std::fs::read_to_string(dir.join("type")).unwrap_or_default();
                // ARPHRD_ETHER only: Wake-on-LAN is an Ethernet thing.
                if link_type.trim() != "1" || name == "lo" {
                    continue;
                }
                // A real card (a `device` link) or an interface carrying an address; this
                // leaves out idle virtual interfaces.
                if !(dir.join("device").exists() || with_address.contains(&name)) {
                    continue;
                }
                let mac = std::fs::read_to_string(dir.join("address")).unwrap_or_default();
                if let Some(mac) = normalise_mac(&mac) {
                    macs.insert(mac);
                }
            }
        }
        let mut macs: Vec<String> = macs.into_iter().collect();
        macs.truncate(MAX_MACS);
        Self {
            hostname,
            os,
            addresses,
            macs,
        }
    }
}

fn first_line(text: &str) -> Option<String> {
    let line = text.lines().next()?.trim();
    (!line.is_empty()).then(|| line.to_owned())
}

/// `PRETTY_NAME` from an os-release file, else `NAME VERSION_ID`.
fn os_name(text: &str) -> Option<String> {
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let v = l.trim().strip_prefix(key)?.strip_prefix('=')?;
            let v = v.trim().trim_matches('"').trim_matches('\'').trim();
            (!v.is_empty()).then(|| v.to_owned())
        })
    };
    let name = value("PRETTY_NAME").or_else(|| match (value("NAME"), value("VERSION_ID")) {
        (Some(n), Some(v)) => Some(format!("{n} {v}")),
        (n, _) => n,
    })?;
    Some(name.chars().filter(|c| !c.is_control()).take(200).collect())
}

/// A gateway-less IPv4 route: a subnet some interface is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ipv4Route {
    iface: String,
    network: u32,
    mask: u32,
    prefix_len: u8,
}

impl Ipv4Route {
    fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask == self.network
    }
}

/// Parses `/proc/net/route` (addresses as host-order hex of network-order bytes).
fn ipv4_routes(text: &str) -> Vec<Ipv4Route> {
    // Addresses are the kernel's raw network-order bytes printed as a native-endian number.
    let addr = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| u32::from_be_bytes(v.to_ne_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let (dest, gateway, mask) = (addr(f[1])?, addr(f[2])?, addr(f[7])?);
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            const RTF_UP: u32 = 0x1;
            const RTF_GATEWAY: u32 = 0x2;
            if gateway != 0 || flags & RTF_UP == 0 || flags & RTF_GATEWAY != 0 || mask == 0 {
                return None;
            }
            // A mask that is not contiguous ones is no subnet.
            if mask.leading_ones() + mask.trailing_zeros() != 32 {
                return None;
            }
            Some(Ipv4Route {
                iface: f[0].to_owned(),
                network: dest & mask,
                mask,
                prefix_len: mask.leading_ones() as u8,
            })
        })
        .collect()
}

/// The addresses `/proc/net/fib_trie` lists as `/32 host LOCAL`: this machine's own.
fn ipv4_local_addresses(text: &str) -> Vec<Ipv4Addr> {
    let mut out = BTreeSet::new();
    let mut last_leaf: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(leaf) = t.strip_prefix("|-- ") {
            last_leaf = leaf.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL")
            && let Some(ip) = last_leaf
        {
            out.insert(ip);
        }
    }
    out.into_iter().collect()
}

/// Parses `/proc/net/if_inet6`: address (32 hex digits), index, prefix length (hex), scope,
/// flags, interface name.
fn ipv6_addresses(text: &str) -> Vec<(Ipv6Addr, u8, String)> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || f[0].len() != 32 {
                return None;
            }
            let ip = Ipv6Addr::from(u128::from_str_radix(f[0], 16).ok()?);
            let prefix = u8::from_str_radix(f[2], 16).ok().filter(|p| *p <= 128)?;
            Some((ip, prefix, f[5].to_owned()))
        })
        .collect()
}

/// `aa:bb:cc:dd:ee:ff` in lower case for a unicast, non-zero MAC; `None` otherwise.
pub(crate) fn normalise_mac(text: &str) -> Option<String> {
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    if bytes.len() != 6 || bytes.iter().all(|b| *b == 0) || bytes[0] & 1 == 1 {
        return None;
    }
    Some(
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB_TRIE: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 192.168.10.0/24 2 0 2
           |-- 192.168.10.0
              /24 link UNICAST
           |-- 192.168.10.23
              /32 host LOCAL
        |-- 192.168.10.255
           /32 link BROADCAST
";
    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010AA8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000AA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";
    const IF_INET6: &str = "fe800000000000000000000000000001 02 40 20 80     eth0
20010db8000000000000000000000042 02 40 00 00     eth0
00000000000000000000000000000001 01 80 10 80       lo
";

    fn fake_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for (path, text) in [
            ("proc/sys/kernel/hostname", "pc-0042\n"),
            (
                "etc/os-release",
                "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\n",
            ),
            ("proc/net/fib_trie", FIB_TRIE),
            ("proc/net/route", ROUTE),
            ("proc/net/if_inet6", IF_INET6),
            ("sys/class/net/eth0/type", "1\n"),
            ("sys/class/net/eth0/address", "52:54:00:AB:CD:EF\n"),
            ("sys/class/net/lo/type", "772\n"),
            ("sys/class/net/lo/address", "00:00:00:00:00:00\n"),
            ("sys/class/net/veth9/type", "1\n"),
            ("sys/class/net/veth9/address", "02:42:ac:11:00:02\n"),
        ] {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, text).expect("write");
        }
        dir
    }

    #[test]
    fn inventory_lists_addresses_with_prefixes_and_real_macs() {
        let root = fake_root();
        let inv = Inventory::gather_from(root.path());
        assert_eq!(inv.hostname, "pc-0042");
        assert_eq!(inv.os, "Debian GNU/Linux 13 (trixie)");
        assert_eq!(
            inv.addresses,
            vec![
                InterfaceAddress {
                    address: "192.168.10.23".parse().expect("ip"),
                    prefix_len: 24
                },
                InterfaceAddress {
                    address: "2001:db8::42".parse().expect("ip"),
                    prefix_len: 64
                },
            ],
            "loopback and link-local left out"
        );
        assert_eq!(
            inv.macs,
            vec!["52:54:00:ab:cd:ef".to_owned()],
            "an idle virtual interface without address is left out"
        );
    }

    #[test]
    fn missing_files_give_an_inventory_with_gaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inv = Inventory::gather_from(dir.path());
        assert!(inv.hostname.is_empty() && inv.addresses.is_empty() && inv.macs.is_empty());
        assert!(!inv.os.is_empty(), "falls back to the platform name");
    }

    #[test]
    fn macs_are_checked() {
        assert_eq!(normalise_mac("00:00:00:00:00:00"), None);
        assert_eq!(normalise_mac("01:00:5e:00:00:01"), None, "multicast");
        assert_eq!(normalise_mac("zz:00:00:00:00:01"), None);
        assert_eq!(
            normalise_mac("AA:BB:CC:00:11:22").as_deref(),
            Some("aa:bb:cc:00:11:22")
        );
    }
}
