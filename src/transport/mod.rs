//! Network transports: [`listen`], accepting connections through TLS and HTTP; `upgraded`,
//! writing the response to a request that asks for an upgrade and reading the connection on;
//! [`ws`], the WebSocket one; and [`address`], who a connection is from.

pub mod address;
pub mod listen;
mod upgraded;
pub mod ws;
