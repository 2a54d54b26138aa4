//! The control API (server, client, bodies).
pub mod client;
mod errors;
pub mod server;
pub mod types;
