//! Palisade's protection for Rust services.
//!
//! Today: connection admission at `accept()` ([`AdmissionListener`]), the
//! same guard the `palisade` daemon runs: open connections overall and per
//! client address, new connections per second per address and overall.
//! Refused connections are reset before a byte is read; an admitted
//! connection carries its permit and gives it back when dropped.
//!
//! With axum (feature `axum`, on by default):
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use palisade::{AdmissionConfig, AdmissionListener};
//!
//! # async fn run() -> std::io::Result<()> {
//! let app = Router::new().route("/", get(|| async { "ok" }));
//! let listener = AdmissionListener::bind("127.0.0.1:3000", AdmissionConfig::default()).await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! Feature flags: `axum` — `AdmissionListener` implements
//! `axum::serve::Listener`.

mod listener;

pub use listener::{AdmissionListener, Admitted};
pub use palisade_limits::admission::{Admission, AdmissionConfig, Refusal};
