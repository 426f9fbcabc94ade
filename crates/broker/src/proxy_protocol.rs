//! The PROXY protocol (HAProxy, versions 1 and 2), read before TLS on listeners that opt in:
//! a TCP load balancer in front of the broker tells the client's real address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte signature of a version 2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 1 line, CRLF included.
const V1_MAX: usize = 107;

/// Why a PROXY header could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ProxyHeaderError {
    /// The connection did not start with a PROXY header although the listener requires one.
    #[error("no PROXY protocol header (is the load balancer configured to send one?)")]
    Missing,
    /// The header is malformed.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// The connection closed or failed while reading.
    #[error("connection closed while reading the PROXY protocol header")]
    Io,
}

/// Reads one PROXY header (v1 or v2) from the start of `stream`, consuming exactly its bytes.
/// Returns the client's address, or `None` when the header says "unknown"/"local" (health
/// checks of the load balancer): the socket's peer address then stands.
pub(crate) async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut first = [0u8; 1];
    stream
        .read_exact(&mut first)
        .await
        .map_err(|_| ProxyHeaderError::Io)?;
    match first[0] {
        b'P' => {
            // Byte by byte, so that nothing after the line (the TLS handshake) is consumed.
            let mut line = vec![b'P'];
            while !line.ends_with(b"\r\n") {
                if line.len() >= V1_MAX {
                    return Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"));
                }
                let mut b = [0u8; 1];
                stream
                    .read_exact(&mut b)
                    .await
                    .map_err(|_| ProxyHeaderError::Io)?;
                line.push(b[0]);
            }
            parse_v1(&line)
        }
        b'\r' => {
            let mut head = [0u8; 16];
            head[0] = b'\r';
            stream
                .read_exact(&mut head[1..])
                .await
                .map_err(|_| ProxyHeaderError::Io)?;
            let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
            let mut body = vec![0u8; len];
            stream
                .read_exact(&mut body)
                .await
                .map_err(|_| ProxyHeaderError::Io)?;
            parse_v2(&head, &body)
        }
        _ => Err(ProxyHeaderError::Missing),
    }
}

/// Parses a whole v1 line (`PROXY TCP4 src dst sport dport\r\n`).
pub(crate) fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let text = std::str::from_utf8(line)
        .map_err(|_| ProxyHeaderError::Malformed("v1 line is not ASCII"))?;
    let text = text
        .strip_suffix("\r\n")
        .ok_or(ProxyHeaderError::Malformed(
            "v1 line does not end with CRLF",
        ))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyHeaderError::Missing);
    }
    let family = parts
        .next()
        .ok_or(ProxyHeaderError::Malformed("v1 family missing"))?;
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let fields: Vec<&str> = parts.collect();
    let [src, _dst, sport, _dport] = fields[..] else {
        return Err(ProxyHeaderError::Malformed("v1 needs 4 address fields"));
    };
    let ip: IpAddr = src
        .parse()
        .map_err(|_| ProxyHeaderError::Malformed("v1 source address"))?;
    let port: u16 = sport
        .parse()
        .map_err(|_| ProxyHeaderError::Malformed("v1 source port"))?;
    match (family, ip) {
        ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(Some(SocketAddr::new(ip, port))),
        _ => Err(ProxyHeaderError::Malformed(
            "v1 family and address disagree",
        )),
    }
}

/// Parses a v2 header: its 16 fixed bytes and the address block.
pub(crate) fn parse_v2(
    head: &[u8; 16],
    body: &[u8],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if head[..12] != V2_SIGNATURE {
        return Err(ProxyHeaderError::Missing);
    }
    if head[12] >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version is not 2"));
    }
    match head[12] & 0x0f {
        0 => return Ok(None), // LOCAL: the balancer's own connection
        1 => {}
        _ => return Err(ProxyHeaderError::Malformed("v2 command unknown")),
    }
    match head[13] >> 4 {
        1 => {
            let b: &[u8; 12] = body
                .get(..12)
                .and_then(|s| s.try_into().ok())
                .ok_or(ProxyHeaderError::Malformed("v2 IPv4 block too short"))?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = u16::from_be_bytes([b[8], b[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        2 => {
            let b: &[u8; 36] = body
                .get(..36)
                .and_then(|s| s.try_into().ok())
                .ok_or(ProxyHeaderError::Malformed("v2 IPv6 block too short"))?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[..16]);
            let port = u16::from_be_bytes([b[32], b[33]]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port,
            )))
        }
        // AF_UNSPEC or AF_UNIX: no usable address.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 203.0.113.7 192.0.2.1 50122 8883\r\n"),
            Ok(Some("203.0.113.7:50122".parse().expect("addr")))
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n"),
            Ok(Some("[2001:db8::1]:4000".parse().expect("addr")))
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(None));
        assert!(parse_v1(b"PROXY TCP4 nonsense 1 2 3\r\n").is_err());
        assert!(parse_v1(b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n").is_err());
    }

    #[test]
    fn v2_proxy_local_and_garbage() {
        let mut head = [0u8; 16];
        head[..12].copy_from_slice(&V2_SIGNATURE);
        head[12] = 0x21;
        head[13] = 0x11;
        head[14..].copy_from_slice(&12u16.to_be_bytes());
        let body = [203, 0, 113, 7, 192, 0, 2, 1, 0xC3, 0xCA, 0x22, 0xB3];
        assert_eq!(
            parse_v2(&head, &body),
            Ok(Some("203.0.113.7:50122".parse().expect("addr")))
        );
        head[12] = 0x20;
        assert_eq!(parse_v2(&head, &body), Ok(None));
        head[12] = 0x21;
        assert!(parse_v2(&head, &body[..4]).is_err());
        head[0] = b'X';
        assert_eq!(parse_v2(&head, &body), Err(ProxyHeaderError::Missing));
    }

    #[tokio::test]
    async fn reading_consumes_exactly_the_header() {
        let data = b"PROXY UNKNOWN\r\n\x16\x03\x01".to_vec();
        let mut reader = &data[..];
        assert_eq!(read_header(&mut reader).await, Ok(None));
        assert_eq!(reader, b"\x16\x03\x01");
        let mut garbage = &b"\x16\x03\x01"[..];
        assert_eq!(
            read_header(&mut garbage).await,
            Err(ProxyHeaderError::Missing)
        );
    }
}
