//! A plain hyper server (no axum) behind a per-client rate limit.
//!
//! ```text
//! cargo run -p palisade --example hyper
//! for i in $(seq 8); do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:3001/; done
//!                                                      # 5 × 200, then 429s
//! curl -i http://127.0.0.1:3001/                       # Retry-After, RateLimit headers
//! ```

use std::convert::Infallible;
use std::num::NonZeroU32;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use palisade::{Quota, ShieldLayer};
use tower::{Layer, Service, service_fn};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    // 5 requests/s per client address; the layer is shared by every connection.
    let limit = ShieldLayer::rate_limit(Quota::per_second(NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    println!("listening on http://127.0.0.1:3001");
    loop {
        let (stream, peer) = listener.accept().await?;
        let handler = service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello\n"))))
        });
        // One service per connection, told its peer address.
        let svc = limit.layer(handler).with_peer(peer);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| svc.clone().call(req));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("{peer}: {e}");
            }
        });
    }
}
