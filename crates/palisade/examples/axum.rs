//! The full Palisade stack in front of an axum app.
//!
//! ```text
//! cargo run -p palisade --example axum
//! curl -i http://127.0.0.1:3000/                       # 200, "hello 127.0.0.1"
//! for i in $(seq 30); do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:3000/; done
//!                                                      # 20 × 200, then 429s
//! curl -i http://127.0.0.1:3000/login                  # a route of its own: 2/s
//! curl -i http://127.0.0.1:3000/fail                   # 500s: the breakers react
//! ```
//!
//! The connection guard resets a client's 51st new connection in a second.

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use palisade::{ClientIp, Palisade, PeerAddr};

/// 20 requests/s per client (bursts of 20), 2/s on `/login`, reputation,
/// both breakers and the connection guard at the daemon's defaults.
pub fn palisade() -> Result<Palisade, palisade::BuildError> {
    Palisade::builder()
        .rate_limit(20)
        .route("login", "/login", 2)
        .build()
}

/// The app: three handlers and the protection layers around them.
pub fn app(palisade: &Palisade) -> Router {
    Router::new()
        .route(
            "/",
            get(|axum::Extension(ClientIp(ip)): axum::Extension<ClientIp>| async move {
                format!("hello {ip}\n")
            }),
        )
        .route("/login", get(|| async { "login form\n" }))
        .route("/fail", get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "failed\n") }))
        .layer(palisade.layer())
}

#[allow(dead_code)] // the tests include this file for `palisade` and `app`
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let palisade = palisade()?;
    let listener = palisade.bind("127.0.0.1:3000").await?;
    println!("listening on http://127.0.0.1:3000 (try: curl -i http://127.0.0.1:3000/)");
    let app = app(&palisade).into_make_service_with_connect_info::<PeerAddr>();
    axum::serve(listener, app).await?;
    Ok(())
}
