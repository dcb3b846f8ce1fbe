//! Verification probes in the sidecar: the orders the operator sent this pod and the results
//! not yet reported. The control stream sets the orders and takes the results; the proxy's
//! verifier ([`crate::proxy::verify`]) sends each order once and leaves its result here. A probe
//! touches nothing else of a target's health: no breaker, no tally, no spend.

use std::collections::BTreeMap;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::configstream::{VerifyOrder, VerifyResult};

/// The orders and results of one sidecar.
#[derive(Debug)]
pub struct VerifyBook {
    orders: watch::Sender<BTreeMap<String, VerifyOrder>>,
    results: Mutex<BTreeMap<String, VerifyResult>>,
}

impl Default for VerifyBook {
    fn default() -> VerifyBook {
        VerifyBook { orders: watch::channel(BTreeMap::new()).0, results: Mutex::default() }
    }
}

impl VerifyBook {
    /// The operator's orders now, by target identity (all of them, every time).
    pub fn set_orders(&self, orders: &BTreeMap<String, VerifyOrder>) {
        self.orders.send_if_modified(|current| {
            if current == orders {
                return false;
            }
            current.clone_from(orders);
            true
        });
    }

    /// Follows the orders.
    pub fn orders(&self) -> watch::Receiver<BTreeMap<String, VerifyOrder>> {
        self.orders.subscribe()
    }

    /// How the probe of `identity` ended.
    pub fn record(&self, identity: &str, result: VerifyResult) {
        self.results.lock().insert(identity.to_string(), result);
    }

    /// The results not yet reported.
    pub fn take_results(&self) -> BTreeMap<String, VerifyResult> {
        std::mem::take(&mut *self.results.lock())
    }
}
