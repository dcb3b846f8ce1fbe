//! The network plumbing the sidecar and the operator share: the accept-and-drain loop behind
//! every listener ([`server`]), request and response bodies ([`body`]), and the outbound HTTPS
//! client with its CA loading ([`client`]).

pub mod body;
pub mod client;
pub mod server;

pub use body::{Body, BoxError};
