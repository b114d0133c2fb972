//! The agent's side of the pre-drain turns: a background task per wait that takes a Lease
//! ([`crate::kube::turns`]), tells the drain, renews it while the pre-drain runs and gives it
//! back when the drain is done with it.

use std::sync::Mutex;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::drain::eviction::backoff;
use crate::drain::machine::Input;
use crate::driver::TurnTaker;
use crate::kube::turns::{RENEW_EVERY, TRY_EVERY, Turns};

pub struct LeaseTurns {
    turns: Turns,
    node: String,
    /// The running wait-and-hold task's "still wanted" flag.
    wanted: Mutex<Option<watch::Sender<bool>>>,
}

impl LeaseTurns {
    pub fn new(turns: Turns, node: &str) -> Self {
        LeaseTurns {
            turns,
            node: node.to_owned(),
            wanted: Mutex::new(None),
        }
    }
}

impl TurnTaker for LeaseTurns {
    fn want(&self, tx: mpsc::UnboundedSender<Input>) {
        let mut slot = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|w| *w.borrow()) {
            return;
        }
        let (flag, mut wanted) = watch::channel(true);
        *slot = Some(flag);
        let (turns, node) = (self.turns.clone(), self.node.clone());
        tokio::spawn(async move {
            let mut failures = 0;
            // Wait for a free turn.
            let name = loop {
                if !*wanted.borrow() {
                    return;
                }
                let wait = match turns.try_take().await {
                    Ok(Some(name)) => break name,
                    Ok(None) => TRY_EVERY,
                    Err(e) => {
                        failures += 1;
                        warn!(node = %node, error = %e, "asking for a pre-drain turn failed");
                        backoff(failures).max(TRY_EVERY)
                    }
                };
                tokio::select! {
                    _ = wanted.changed() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            };
            info!(node = %node, lease = %name, "pre-drain turn taken");
            if tx.send(Input::Turn(true)).is_err() {
                let _ = turns.give_back(&name).await;
                return;
            }
            // Hold it until the drain is done with it.
            loop {
                tokio::select! {
                    changed = wanted.changed() => {
                        if changed.is_err() || !*wanted.borrow() {
                            break;
                        }
                    }
                    _ = tokio::time::sleep(RENEW_EVERY) => {
                        match turns.renew(&name).await {
                            Ok(true) => {}
                            Ok(false) => {
                                warn!(node = %node, lease = %name, "pre-drain turn lost");
                                let _ = tx.send(Input::Turn(false));
                                return;
                            }
                            Err(e) => warn!(node = %node, lease = %name, error = %e, "renewing the pre-drain turn failed"),
                        }
                    }
                }
            }
            match turns.give_back(&name).await {
                Ok(()) => info!(node = %node, lease = %name, "pre-drain turn given back"),
                Err(e) => {
                    warn!(node = %node, lease = %name, error = %e, "giving the pre-drain turn back failed; it is free once it expires")
                }
            }
        });
    }

    fn release(&self) {
        let slot = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flag) = slot.as_ref() {
            let _ = flag.send(false);
        }
    }
}
