//! Network transports. Only [`ws`] names actix-web-actors.

pub mod ws;
