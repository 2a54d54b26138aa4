//! What the daemon's tasks share: the service (rules, kernel, interfaces),
//! the offender table fed by kernel events, and the detach request.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::{events::Offenders, service::Service};

#[derive(Clone)]
pub struct Shared {
    pub service: Arc<Mutex<Service>>,
    pub offenders: Arc<Mutex<Offenders>>,
    /// Set by `POST /v1/detach`: the daemon detaches everything and exits.
    pub detach: watch::Sender<bool>,
}
