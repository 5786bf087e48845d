//! Network transports: [`ws`], the WebSocket one, and [`address`], who a connection is from.

pub mod address;
pub mod ws;
