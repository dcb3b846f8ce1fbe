//! Where policies come from and how they reach the request path: today a local file, watched
//! and reloaded; the operator's authenticated config stream slots in beside it.

pub mod file;
