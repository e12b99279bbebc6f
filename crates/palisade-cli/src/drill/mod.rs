//! `palisade drill`: real attacks on a real Palisade in network namespaces
//! the drill makes, while a legitimate population keeps using the service.

pub mod forged;
pub mod packet;
pub mod report;
