//! The one-shot commands: `check` (preflight), `status` (the node's guard at a glance), `drain`
//! (the drain on demand, through the same driver as the agent) and `uncordon`.

pub mod check;
pub mod drain;
pub mod status;
pub mod uncordon;
