//! Turns for pre-drains. unattended-upgrades gives every node the same `Automatic-Reboot-Time`,
//! so a whole cluster can schedule its reboot for the same minute; pre-drained all at once, the
//! nodes would send their VMs to one another. A node pre-drains only while it holds one of
//! `slots` `coordination.k8s.io` Leases (`shutdown-guard-turn-<i>` in the agent's namespace),
//! renewed while it drains and given back when its node is empty. A holder that dies stops
//! renewing; its Lease is free once `leaseDurationSeconds` has passed.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

pub const LEASE_PREFIX: &str = "shutdown-guard-turn-";
/// A turn not renewed for this long is free for the next node.
pub const LEASE_DURATION: Duration = Duration::from_secs(30);
/// A third of the duration, so two renewals may fail before the turn is lost.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// How often a node waiting for its turn looks again.
pub const TRY_EVERY: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `me` may take a turn whose Lease reads `spec` at `now`: nobody holds it, we do, or
/// its holder stopped renewing it.
pub fn takeable(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else {
        return true;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == me => true,
        Some(_) => {
            let duration = spec.lease_duration_seconds.unwrap_or(0).max(0) as i64;
            let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref());
            renewed.is_none_or(|t| t.0.as_second().saturating_add(duration) < now.as_second())
        }
    }
}

fn held_by(me: &str, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(kube::Error::Api(Box::new(
                kube::core::Status::failure(
                    &format!("no answer within {CALL_TIMEOUT:?}"),
                    "Timeout",
                )
                .with_code(504),
            )))
        })
}

/// The turns of one node.
#[derive(Clone)]
pub struct Turns {
    api: Api<Lease>,
    me: String,
    slots: u32,
    prefix: &'static str,
}

impl Turns {
    pub fn new(api: Api<Lease>, me: &str, slots: u32) -> Self {
        Self::with_prefix(api, me, slots, LEASE_PREFIX)
    }

    /// Turns of another kind, in Leases named `<prefix><i>`.
    pub fn with_prefix(api: Api<Lease>, me: &str, slots: u32, prefix: &'static str) -> Self {
        Turns {
            api,
            me: me.to_owned(),
            slots,
            prefix,
        }
    }

    /// Takes a free turn if there is one: the name of its Lease. A conflict (another node took
    /// it between our read and write) moves on to the next.
    pub async fn try_take(&self) -> Result<Option<String>, kube::Error> {
        for i in 0..self.slots {
            let name = format!("{}{i}", self.prefix);
            let now = Timestamp::now();
            let current = bounded(self.api.get_opt(&name)).await?;
            let taken = match current {
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(held_by(&self.me, now, None, 0)),
                    };
                    bounded(self.api.create(&PostParams::default(), &lease)).await
                }
                Some(mut lease) if takeable(lease.spec.as_ref(), &self.me, now) => {
                    let old = lease.spec.take().unwrap_or_default();
                    let ours = old.holder_identity.as_deref() == Some(self.me.as_str());
                    let transitions = old.lease_transitions.unwrap_or(0) + i32::from(!ours);
                    let acquired = if ours { old.acquire_time } else { None };
                    lease.spec = Some(held_by(&self.me, now, acquired, transitions));
                    // The resourceVersion read makes this a compare-and-swap.
                    bounded(self.api.replace(&name, &PostParams::default(), &lease)).await
                }
                Some(_) => continue,
            };
            match taken {
                Ok(_) => return Ok(Some(name)),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Renews a turn we hold; `Ok(false)` when it is no longer ours.
    pub async fn renew(&self, name: &str) -> Result<bool, kube::Error> {
        let Some(mut lease) = bounded(self.api.get_opt(name)).await? else {
            return Ok(false);
        };
        let mut spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
            return Ok(false);
        }
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        match bounded(self.api.replace(name, &PostParams::default(), &lease)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives a turn back at once, for the next node, if it is still ours.
    pub async fn give_back(&self, name: &str) -> Result<(), kube::Error> {
        let Some(mut lease) = bounded(self.api.get_opt(name)).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        lease.spec = Some(spec);
        match bounded(self.api.replace(name, &PostParams::default(), &lease)).await {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn held(by: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(30),
            renew_time: Some(MicroTime(at(renewed))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_turn_is_free_unheld_ours_or_unrenewed_for_its_duration() {
        assert!(takeable(None, "node-1", at(1000)));
        assert!(takeable(Some(&LeaseSpec::default()), "node-1", at(1000)));
        assert!(takeable(Some(&held("node-1", 990)), "node-1", at(1000)));
        assert!(!takeable(Some(&held("node-2", 990)), "node-1", at(1000)));
        assert!(!takeable(Some(&held("node-2", 970)), "node-1", at(1000)));
        assert!(takeable(Some(&held("node-2", 969)), "node-1", at(1000)));
    }
}
