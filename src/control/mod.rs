//! Where policies come from and how they reach the request path: a local file, watched and
//! reloaded ([`file`]), or the operator's authenticated config stream ([`stream`], whose
//! contract is [`crate::configstream`]) with the last configuration applied kept on local disk
//! ([`state`]).

pub mod file;
pub mod state;
pub mod stream;
