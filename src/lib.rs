//! shutdown-guard: holds a node's shutdown with a systemd-logind delay inhibitor until the
//! node's KubeVirt VMs have migrated away or stopped, then lets the shutdown go on.

pub mod admin;
pub mod agent;
pub mod bootid;
pub mod check;
pub mod config;
pub mod drain;
pub mod kube;
pub mod logind;
pub mod logind_conf;
pub mod metrics;
pub mod ondemand;
pub mod progress;
pub mod status;
pub mod telemetry;
