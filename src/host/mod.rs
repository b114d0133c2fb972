//! The node's side: logind (the lock and the shutdown signals, the scheduled shutdown), logind's
//! configuration files, and the kernel's boot ID. Adapters only; nothing here knows the agent.

pub mod bootid;
pub mod logind;
pub mod logind_conf;
pub mod schedule;
