//! ringpen: a Pen-compatible TCP load balancer with an io_uring data plane.
//!
//! Data flows one way: [`cli`] builds a [`config::Config`]; the control
//! thread ([`control`]) owns the mutable state and publishes immutable
//! [`routing::RoutingTable`]s; the [`dataplane`] workers read them lock-free.

pub mod accesslog;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod health;
pub mod process;
pub mod routing;
pub mod select;
#[cfg(test)]
mod test_rng;
pub mod text;
