//! Half-open TCP connections from the kernel's `sock_diag` netlink
//! interface (`NETLINK_SOCK_DIAG`, what `ss` uses), asking only for sockets
//! in SYN-RECV.
//!
//! `/proc/net/tcp` lists every socket on the host as text: with tens of
//! thousands of connections (or TIME-WAIT sockets after a burst of short
//! ones) one scan is megabytes, read a page per syscall and parsed every
//! poll. Here the kernel filters by state, so a scan costs a few syscalls
//! and is proportional to the half-open connections alone.

use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket as RawSocket, Type};

use crate::procnet::Socket;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_SYN_RECV: u32 = 3;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_msg`: family, state, timer, retrans, the 48-byte
/// socket id, then five u32s.
const INET_DIAG_MSG: usize = 72;

/// Every TCP socket in SYN-RECV (request sockets included), IPv4 and IPv6,
/// in the calling thread's network namespace.
pub fn syn_recv() -> io::Result<Vec<Socket>> {
    let sock = RawSocket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(NETLINK_SOCK_DIAG)),
    )?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        // Unconnected netlink sockets send to the kernel.
        sock.send(&request(seq, family))?;
        'dump: loop {
            let n = (&sock).read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sock_diag closed"));
            }
            for msg in messages(&buf[..n])? {
                match msg {
                    Message::Done => break 'dump,
                    Message::Socket(s) => out.push(s),
                    Message::Other => {}
                }
            }
        }
    }
    Ok(out)
}

/// The user that owns the TCP socket at `peer` connected to `local`, both
/// on this host (a loopback client of one of our listeners): one exact
/// `sock_diag` lookup. `None` when the kernel knows no such socket.
pub fn owner(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    let sock = RawSocket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(NETLINK_SOCK_DIAG)),
    )?;
    sock.send(&lookup(peer, local))?;
    let mut buf = vec![0u8; 8 * 1024];
    let n = (&sock).read(&mut buf)?;
    match messages_with_uid(&buf[..n]) {
        Ok(uid) => Ok(uid),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A request for the one socket whose own end is `src` and whose other end
/// is `dst`, in any state.
fn lookup(src: SocketAddr, dst: SocketAddr) -> [u8; NLMSG_HDR + 56] {
    const LEN: usize = NLMSG_HDR + 56;
    let octets = |a: SocketAddr| -> [u8; 16] {
        match a.ip().to_canonical() {
            IpAddr::V4(v4) => {
                let mut o = [0u8; 16];
                o[..4].copy_from_slice(&v4.octets());
                o
            }
            IpAddr::V6(v6) => v6.octets(),
        }
    };
    let family = match src.ip().to_canonical() {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    };
    let mut m = [0u8; LEN];
    m[0..4].copy_from_slice(&(LEN as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, then
    // the id: sport, dport (big-endian), src[16], dst[16], interface,
    // cookie (INET_DIAG_NOCOOKIE: any).
    m[16] = family;
    m[17] = libc::IPPROTO_TCP as u8;
    m[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
    m[24..26].copy_from_slice(&src.port().to_be_bytes());
    m[26..28].copy_from_slice(&dst.port().to_be_bytes());
    m[28..44].copy_from_slice(&octets(src));
    m[44..60].copy_from_slice(&octets(dst));
    m[64..72].copy_from_slice(&[0xff; 8]);
    m
}

/// The `idiag_uid` of the first socket in a reply.
fn messages_with_uid(buf: &[u8]) -> io::Result<Option<u32>> {
    if buf.len() < NLMSG_HDR {
        return Err(bad("truncated message"));
    }
    let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if len < NLMSG_HDR || len > buf.len() {
        return Err(bad("truncated message"));
    }
    let payload = &buf[NLMSG_HDR..len];
    match kind {
        NLMSG_ERROR => {
            let errno = payload
                .get(0..4)
                .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            Err(io::Error::from_raw_os_error(-errno))
        }
        SOCK_DIAG_BY_FAMILY if payload.len() >= INET_DIAG_MSG => {
            // After the id: expires, rqueue, wqueue, then uid.
            Ok(Some(u32::from_ne_bytes([
                payload[64],
                payload[65],
                payload[66],
                payload[67],
            ])))
        }
        _ => Err(bad("unexpected reply")),
    }
}

/// A dump request for TCP sockets of `family` in SYN-RECV.
fn request(seq: u32, family: u8) -> [u8; NLMSG_HDR + 56] {
    const LEN: usize = NLMSG_HDR + 56;
    let mut m = [0u8; LEN];
    m[0..4].copy_from_slice(&(LEN as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, id.
    m[16] = family;
    m[17] = libc::IPPROTO_TCP as u8;
    m[20..24].copy_from_slice(&(1u32 << TCP_SYN_RECV).to_ne_bytes());
    m
}

enum Message {
    Socket(Socket),
    Done,
    Other,
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {why}"))
}

/// Splits one datagram into netlink messages and decodes the sockets.
fn messages(mut buf: &[u8]) -> io::Result<Vec<Message>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDR || len > buf.len() {
            return Err(bad("truncated message"));
        }
        let payload = &buf[NLMSG_HDR..len];
        out.push(match kind {
            NLMSG_DONE => Message::Done,
            NLMSG_ERROR => {
                let errno = payload
                    .get(0..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                return Err(io::Error::from_raw_os_error(-errno));
            }
            SOCK_DIAG_BY_FAMILY => Message::Socket(socket(payload)?),
            _ => Message::Other,
        });
        // Messages are 4-byte aligned.
        let next = len.next_multiple_of(4).min(buf.len());
        buf = &buf[next..];
    }
    Ok(out)
}

/// Decodes a `struct inet_diag_msg`.
fn socket(m: &[u8]) -> io::Result<Socket> {
    if m.len() < INET_DIAG_MSG {
        return Err(bad("short inet_diag_msg"));
    }
    let family = m[0];
    let state = m[1];
    // id: sport, dport (big-endian), src[16], dst[16], interface, cookie.
    let sport = u16::from_be_bytes([m[4], m[5]]);
    let dport = u16::from_be_bytes([m[6], m[7]]);
    let addr = |at: usize| -> io::Result<IpAddr> {
        let bytes: [u8; 16] = m[at..at + 16].try_into().map_err(|_| bad("address"))?;
        match i32::from(family) {
            libc::AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
            libc::AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(bytes))),
            _ => Err(bad("unknown address family")),
        }
    };
    Ok(Socket {
        local: (addr(8)?, sport),
        remote: (addr(24)?, dport),
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(family: u8, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut m = vec![0u8; NLMSG_HDR + INET_DIAG_MSG];
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let p = &mut m[NLMSG_HDR..];
        p[0] = family;
        p[1] = TCP_SYN_RECV as u8;
        p[4..6].copy_from_slice(&sport.to_be_bytes());
        p[6..8].copy_from_slice(&dport.to_be_bytes());
        p[8..12].copy_from_slice(&src);
        p[24..28].copy_from_slice(&dst);
        m
    }

    #[test]
    fn decodes_sockets_until_done_and_rejects_truncation() {
        let mut buf = reply(libc::AF_INET as u8, [198, 18, 5, 1], 8080, [198, 18, 5, 2], 40000);
        buf.extend(reply(
            libc::AF_INET as u8,
            [198, 18, 5, 1],
            8080,
            [198, 18, 5, 3],
            40001,
        ));
        let mut done = vec![0u8; NLMSG_HDR + 4];
        let len = done.len() as u32;
        done[0..4].copy_from_slice(&len.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        buf.extend(&done);
        let msgs = messages(&buf).unwrap_or_else(|e| panic!("{e}"));
        let sockets: Vec<Socket> = msgs
            .iter()
            .filter_map(|m| match m {
                Message::Socket(s) => Some(*s),
                _ => None,
            })
            .collect();
        assert_eq!(sockets.len(), 2);
        assert!(sockets.iter().all(Socket::is_syn_recv));
        assert_eq!(
            sockets[1].local,
            (
                "198.18.5.1".parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                8080
            )
        );
        assert_eq!(sockets[1].remote.1, 40001);
        assert!(matches!(msgs.last(), Some(Message::Done)));
        assert!(messages(&buf[..NLMSG_HDR + 10]).is_err());
    }

    #[test]
    fn kernel_errors_come_back_as_errno() {
        let mut m = vec![0u8; NLMSG_HDR + 4];
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        let e = messages(&m).err().map(|e| e.raw_os_error());
        assert_eq!(e, Some(Some(libc::EPERM)));
    }

    #[test]
    fn the_owner_of_a_loopback_client_is_this_process_user() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let local = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        // A socket belongs to the filesystem uid that made it: as root,
        // make the client as nobody, so a reply read as zeros cannot pass.
        // SAFETY: setfsuid changes only this thread's filesystem uid, and
        // the old one is put back right after; getuid cannot fail.
        let (was, me) = unsafe { (libc::setfsuid(65534), libc::getuid()) };
        let client = std::net::TcpStream::connect(local);
        // SAFETY: as above.
        unsafe { libc::setfsuid(u32::try_from(was).unwrap_or(me)) };
        let client = client.unwrap_or_else(|e| panic!("{e}"));
        let expected = if me == 0 { 65534 } else { me };
        let (_served, peer) = listener.accept().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(peer, client.local_addr().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(
            owner(local, peer).unwrap_or_else(|e| panic!("{e}")),
            Some(expected)
        );
        // No such socket: nobody.
        let gone = SocketAddr::from(([127, 0, 0, 1], 1));
        assert_eq!(owner(local, gone).unwrap_or_else(|e| panic!("{e}")), None);
    }

    #[test]
    fn the_live_kernel_answers() {
        // Whatever is half-open on this host right now, the dump completes.
        let sockets = syn_recv().unwrap_or_else(|e| panic!("sock_diag: {e}"));
        assert!(sockets.iter().all(Socket::is_syn_recv));
    }
}
