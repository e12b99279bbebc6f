//! Tunnel throughput for a large transfer: `splice(2)` vs user-space copy
//! (`tokio::io::copy_bidirectional`), same loopback sockets, same bytes.
//!
//! Run: `cargo bench -p palisade-proxy --bench tunnel`
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use tokio::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BYTES: usize = 64 << 20;

/// A connected pair of loopback sockets.
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    (a.unwrap(), b.unwrap().0)
}

/// Sends BYTES from a source through a tunnel (made by `tunnel`) to a sink.
async fn transfer<F, Fut>(tunnel: F) -> Duration
where
    F: FnOnce(TcpStream, TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (mut source, near) = pair().await;
    let (far, mut sink) = pair().await;
    let started = Instant::now();
    let t = tokio::spawn(tunnel(near, far));
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..BYTES / chunk.len() {
            source.write_all(&chunk).await.unwrap();
        }
        source.shutdown().await.unwrap();
        // Keep the source open until the sink has everything.
        let mut rest = Vec::new();
        let _ = source.read_to_end(&mut rest).await;
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    while got < BYTES {
        let n = sink.read(&mut buf).await.unwrap();
        assert!(n > 0, "tunnel ended early at {got}");
        got += n;
    }
    let elapsed = started.elapsed();
    drop(sink);
    let _ = writer.await;
    t.abort();
    elapsed
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("tunnel_64MiB");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.sample_size(10);
    g.bench_function("splice", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += transfer(|a, b| async move {
                        let activity = palisade_proxy::tunnel::Activity::new();
                        let _ = palisade_proxy::tunnel::splice::bidirectional(&a, &b, &activity).await;
                    })
                    .await;
                }
                total
            })
        })
    });
    g.bench_function("copy", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += transfer(|mut a, mut b| async move {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    })
                    .await;
                }
                total
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
