//! shutdown-guard: holds a node's shutdown with a systemd-logind delay inhibitor until the
//! node's KubeVirt VMs have migrated away or stopped, then lets the shutdown go on.
//!
//! Layers, each depending only on those below it:
//! - [`drain`]: the decisions, pure (model, plan, eviction answers, KubeVirt's rules, the state
//!   machine, progress);
//! - [`kube`] and [`host`]: adapters to the API server and to the node (logind, boot ID);
//! - [`driver`]: the one executor that runs a drain against them;
//! - [`holder`] (`run`: the lock, and nothing else) and [`agent`] (`worker`: the drain, started
//!   by the holder), [`cli`] (`check`, `status`, `drain`, `uncordon`) and [`admin`] (the HTTP
//!   endpoints): the callers.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod drain;
pub mod driver;
pub mod holder;
pub mod host;
pub mod kube;
pub mod telemetry;
