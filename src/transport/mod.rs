//! Network transports: [`ws`], the WebSocket one.

pub mod ws;
