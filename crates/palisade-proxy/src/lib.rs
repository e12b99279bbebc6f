//! The Palisade daemon as a library: config, listeners, the reverse proxy
//! with its protection pipeline, the admin API and metrics.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use palisade_proxy::config::{Config, Overrides};
//!
//! let config = Config::quickstart(&Overrides::default())?;
//! let running = palisade_proxy::start(config).await?;
//! println!("proxy on {}", running.proxy_addr);
//! tokio::signal::ctrl_c().await?;
//! // /readyz says 503 and requests are still served for server.drain_delay
//! // (or until a second Ctrl-C); then in-flight requests finish.
//! running.drain(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```

pub mod access_log;
pub mod admin;
pub mod body;
pub mod challenge;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connector;
pub mod demo;
pub mod feed;
pub mod forward;
pub mod health;
pub mod hello;
pub mod io;
pub mod maintenance;
pub mod metrics;
pub mod never_ban;
pub mod pool;
mod process;
pub mod profile;
pub mod proxy;
pub mod reload;
pub mod respond;
pub mod server;
pub mod stall;
pub mod state;
pub mod syn;
pub mod tasks;
pub mod tls;
mod trim;
pub mod tunnel;
pub mod upstream_tls;

pub use server::{Running, start, start_reloadable};

/// Whether this build carries the XDP program (clang and libbpf-dev were
/// present when it was compiled).
pub fn xdp_built() -> bool {
    palisade_kernel::xdp::XdpDefense::built()
}
