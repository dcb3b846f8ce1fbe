//! Where policies come from and how they reach the request path: a local file, watched and
//! reloaded ([`file`]), or the operator's authenticated config stream ([`stream`], wire format
//! in [`protocol`]) with the last configuration applied kept on local disk ([`state`]).

pub mod file;
pub mod protocol;
pub mod state;
pub mod stream;
