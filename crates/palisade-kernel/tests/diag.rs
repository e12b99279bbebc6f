//! Half-open connections as sock_diag reports them, against real request
//! sockets in a namespace this test creates (and deletes): a client
//! namespace that drops the SYN-ACKs it gets leaves its handshakes
//! half-open on the server, and the netlink dump must list exactly what
//! `/proc/net/tcp` lists.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use palisade_kernel::diag;
use palisade_kernel::netns::Netns;
use palisade_kernel::procnet::{half_open, parse_tcp_table};

#[test]
fn sock_diag_lists_the_half_open_handshakes_proc_lists() {
    let Some(srv) = Netns::for_test("diagsrv") else {
        return;
    };
    let Some(cli) = Netns::for_test("diagcli") else {
        return;
    };
    srv.link(&cli, "198.18.5.1/24", &["198.18.5.2/24"]).unwrap();
    // The client never answers SYN-ACKs, so nothing completes.
    cli.run(&["nft", "add", "table", "inet", "t"]).unwrap();
    cli.run(&[
        "nft", "add", "chain", "inet", "t", "in", "{", "type", "filter", "hook", "input", "priority", "0",
        ";", "}",
    ])
    .unwrap();
    cli.run(&[
        "nft",
        "add",
        "rule",
        "inet",
        "t",
        "in",
        "tcp",
        "flags",
        "&",
        "(syn|ack)",
        "==",
        "syn|ack",
        "drop",
    ])
    .unwrap();
    let listener = srv
        .enter(|| TcpListener::bind("198.18.5.1:8080").unwrap())
        .join()
        .unwrap();
    // Ten handshakes started (non-blocking connects), kept open.
    let pending = cli
        .enter(|| {
            (0..10)
                .map(|_| {
                    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                    s.set_nonblocking(true).unwrap();
                    let to: SocketAddr = "198.18.5.1:8080".parse().unwrap();
                    let _ = s.connect(&to.into());
                    s
                })
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
    let mut seen = (0, 0, false);
    for _ in 0..100 {
        seen = srv
            .enter(|| {
                let from_diag = diag::syn_recv().unwrap();
                // This thread's namespace (/proc/net follows the process's).
                let text = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap();
                let from_proc = parse_tcp_table(&text).unwrap();
                let (d, d_per) = half_open(&from_diag, &[8080]);
                let (p, p_per) = half_open(&from_proc, &[8080]);
                (d, p, d_per == p_per)
            })
            .join()
            .unwrap();
        if seen == (10, 10, true) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        seen,
        (10, 10, true),
        "(sock_diag, /proc/net/tcp) half-open counts, same sources"
    );
    drop((pending, listener));
}
