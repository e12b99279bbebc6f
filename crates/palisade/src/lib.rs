//! Palisade's protection for Rust services.

mod breaker;
#[cfg(feature = "config")]
pub mod config;
mod listener;
pub mod respond;
mod shield;

pub use breaker::{BreakerFuture, BreakerLayer, BreakerService, BreakerSettings, StatusSet};
pub use listener::{AdmissionListener, Admitted};
pub use palisade_limits::admission::{Admission, AdmissionConfig, Refusal};
pub use shield::{
    BoxError, ClientIp, Early, Fail, Finished, LocalRefusal, MissingPeer, PeerAddr, Pipeline, Refused, Reply,
    Respond, ResponseFuture, ShieldLayer, ShieldService,
};
