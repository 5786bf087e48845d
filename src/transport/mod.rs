//! Network transports: [`listen`], accepting connections through TLS and HTTP; [`ws`], the
//! WebSocket one; and [`address`], who a connection is from.

pub mod address;
pub mod listen;
pub mod ws;
