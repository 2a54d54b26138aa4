//! The control API (server, client, bodies).
pub mod client;
pub mod server;
pub mod types;
