//! The drain's decisions, pure: no I/O, no clock, no Kubernetes client. The objects' relevant
//! fields ([`model`]), which pods go ([`plan`]), what an eviction answer means ([`eviction`]),
//! KubeVirt's strategy rules ([`fate`]), the state machine ([`machine`]), per-VMI progress
//! ([`progress`]), what is reported ([`report`]) and power events ([`power`]). [`crate::driver`] runs the machine.

pub mod eviction;
pub mod fate;
pub mod keeper;
pub mod machine;
pub mod model;
pub mod plan;
pub mod power;
pub mod progress;
pub mod report;
