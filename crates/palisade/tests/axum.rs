//! The admission listener under a real axum server and real sockets.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::{Router, routing::get};
use palisade::{AdmissionConfig, AdmissionListener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

async fn served(from: &str, to: SocketAddr) -> bool {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => buf.starts_with(b"HTTP/1.1 200"),
        Ok(Err(_)) => false,
        Err(_) => panic!("neither served nor reset"),
    }
}

#[tokio::test]
async fn axum_behind_the_admission_listener() {
    let cfg = AdmissionConfig {
        new_per_ip_per_second: NonZeroU32::new(5),
        ..Default::default()
    };
    let listener = AdmissionListener::bind("127.0.0.1:0", cfg).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admission = listener.admission().clone();
    let app = Router::new().route("/", get(|| async { "ok" }));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let started = tokio::time::Instant::now();
    let mut ok = 0u32;
    for _ in 0..20 {
        ok += u32::from(served("127.0.0.80", addr).await);
    }
    let elapsed = started.elapsed().as_secs_f64();
    // A burst of 5 new connections, plus 5/s refilled while the loop ran.
    assert!(ok >= 5, "{ok}");
    assert!(
        f64::from(ok) <= 5.0 + 5.0 * elapsed + 1.0,
        "{ok} served in {elapsed:.2}s"
    );
    assert!(served("127.0.0.81", addr).await, "another address was refused");
    // Closed connections gave their places back.
    let mut open = u32::MAX;
    for _ in 0..50 {
        open = admission.open();
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, 0);
    server.abort();
}
