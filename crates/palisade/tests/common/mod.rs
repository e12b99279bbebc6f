//! Shared by the test binaries: a real server around a built stack.

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use palisade::{Palisade, PeerAddr};

/// Serves, on an ephemeral loopback port behind `palisade`'s guard and
/// layers, an app that answers with its client's address (the one a PROXY
/// header named, if any).
pub async fn serve_client_echo(
    palisade: &Palisade,
) -> (SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = palisade.bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(|ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>| async move {
                peer.ip().to_string()
            }),
        )
        .layer(palisade.layer())
        .into_make_service_with_connect_info::<PeerAddr>();
    (
        addr,
        tokio::spawn(async move { axum::serve(listener, app).await }),
    )
}
