//! The SYN capture socket in a real kernel: a network namespace pair
//! (198.18.0.0/15), real TCP handshakes and data; only the SYNs arrive.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use palisade_kernel::capture::SynCapture;
use palisade_kernel::netns::Netns;

#[test]
fn the_filter_lets_only_syns_through() {
    let Some(srv) = Netns::for_test("capsrv") else {
        return;
    };
    let Some(cli) = Netns::for_test("capcli") else {
        return;
    };
    srv.link(&cli, "198.18.2.1/24", &["198.18.2.2/24"]).unwrap();
    // Capture and an echo server, both in the server namespace.
    let capture = srv.enter(|| {
        let cap = SynCapture::open().unwrap();
        let listener = TcpListener::bind("198.18.2.1:7000").unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let mut s = s.unwrap();
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    s.write_all(&buf[..n]).unwrap();
                }
            }
        });
        cap
    });
    let cap = capture.join().unwrap();
    let reader = std::thread::spawn(move || {
        let mut syns = Vec::new();
        // Bounded: at most 3 s of 100 ms read timeouts.
        for _ in 0..30 {
            while let Some(s) = cap.next().unwrap() {
                syns.push(s);
            }
            if syns.len() >= 5 {
                break;
            }
        }
        syns
    });
    cli.enter(|| {
        for _ in 0..5 {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from(([198, 18, 2, 1], 7000)),
                Duration::from_secs(2),
            )
            .unwrap();
            // Data and ACKs both ways: none of it may be captured.
            for _ in 0..20 {
                s.write_all(b"hello").unwrap();
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).unwrap();
            }
        }
    })
    .join()
    .unwrap();
    let syns = reader.join().unwrap();
    assert_eq!(syns.len(), 5, "{syns:?}");
    for (s, age) in &syns {
        assert_eq!(s.source, IpAddr::from([198, 18, 2, 2]));
        assert_eq!(s.port, 7000);
        // Stamped by the kernel on arrival, read soon after.
        assert!(*age < Duration::from_secs(3), "{age:?}");
    }
}
