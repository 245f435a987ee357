//! Portico: an edge gateway. Config → compile → immutable Snapshot behind an ArcSwap →
//! pingora filters that only look things up. See DESIGN.md for the data flow.

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod egress;
pub mod l4;
pub mod lifecycle;
pub mod listener;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
pub mod upstream;
