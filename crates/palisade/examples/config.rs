//! Palisade configured from the daemon's TOML file, in front of an axum app.
//!
//! ```text
//! cargo run -p palisade --example config -- crates/palisade/examples/palisade.toml
//! for i in $(seq 8); do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:3002/; done
//!                                                      # 5 × 200, then 429s
//! ```
//!
//! A mistake in the file is reported with its line and key, e.g.
//! `palisade.toml:4:1: rate_limit.rate: must be between 1 and 10000000`.

use axum::Router;
use axum::routing::get;
use palisade::{Palisade, PeerAddr};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/examples/palisade.toml").to_string());
    let palisade = Palisade::from_file(&path)?;
    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .layer(palisade.layer());
    let listener = palisade.bind("127.0.0.1:3002").await?;
    println!("{path}: listening on http://127.0.0.1:3002");
    axum::serve(listener, app.into_make_service_with_connect_info::<PeerAddr>()).await?;
    Ok(())
}
