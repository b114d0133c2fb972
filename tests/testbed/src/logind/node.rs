//! A node's logind, whichever flavour runs it, behind one enum the bed keeps per node.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::{Elogind, Inhibitor, LogindError, LogindNode, ReleaseWatch, SystemdNode};

/// A node's logind: systemd as PID 1 of a namespace container, or elogind on a private bus.
pub enum NodeLogind {
    Systemd(SystemdNode),
    Elogind(Elogind),
}

macro_rules! delegate {
    ($self:ident, $n:ident => $e:expr) => {
        match $self {
            NodeLogind::Systemd($n) => $e,
            NodeLogind::Elogind($n) => $e,
        }
    };
}

impl NodeLogind {
    pub fn bus_address(&self) -> String {
        delegate!(self, n => n.bus_address())
    }
    pub fn pod_bus_address(&self) -> String {
        delegate!(self, n => n.pod_bus_address())
    }
    pub fn boot_id(&self) -> String {
        delegate!(self, n => n.boot_id())
    }
    pub fn pod_command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        delegate!(self, n => n.pod_command(program, args))
    }
    pub async fn poweroff(&self) -> Result<(), LogindError> {
        delegate!(self, n => n.poweroff().await)
    }
    pub async fn wait_poweroff(&self, timeout: Duration) -> Result<SystemTime, LogindError> {
        delegate!(self, n => n.wait_poweroff(timeout).await)
    }
    pub async fn set_inhibit_delay_max(&self, secs: u64) -> Result<Duration, LogindError> {
        delegate!(self, n => n.set_inhibit_delay_max(secs).await)
    }
    pub async fn inhibit_delay_max(&self) -> Result<Duration, LogindError> {
        delegate!(self, n => n.inhibit_delay_max().await)
    }
    pub async fn list_inhibitors(&self) -> Result<Vec<Inhibitor>, LogindError> {
        delegate!(self, n => n.list_inhibitors().await)
    }
    pub fn poweroff_shell_command(&self) -> String {
        delegate!(self, n => n.poweroff_shell_command())
    }
    pub fn wait_poweroff_shell_command(&self) -> String {
        delegate!(self, n => n.wait_poweroff_shell_command())
    }
    pub fn systemd(&mut self) -> Option<&mut SystemdNode> {
        match self {
            NodeLogind::Systemd(n) => Some(n),
            NodeLogind::Elogind(_) => None,
        }
    }
    pub fn systemd_ref(&self) -> Option<&SystemdNode> {
        match self {
            NodeLogind::Systemd(n) => Some(n),
            NodeLogind::Elogind(_) => None,
        }
    }
    pub fn memory_kib(&self) -> u64 {
        delegate!(self, n => n.memory_kib())
    }

    /// Host PID of the process whose root is the node's: systemd's PID 1, or the elogind
    /// namespace's init.
    pub fn pid(&self) -> u32 {
        delegate!(self, n => n.pid())
    }

    /// The node's root folder as the machine sees it (`/proc/<pid>/root`).
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid()))
    }

    /// `"systemd 257 (trixie)"` and the like.
    pub fn describe(&self) -> String {
        match self {
            NodeLogind::Systemd(n) => match n.suite() {
                super::Suite::Trixie => "systemd 257 (trixie)".into(),
                super::Suite::Bookworm => "systemd 252 (bookworm)".into(),
                super::Suite::TrixiePolkit => "systemd 257 (trixie) with polkitd".into(),
                super::Suite::Bullseye => "systemd 247 (bullseye)".into(),
            },
            NodeLogind::Elogind(_) => "elogind 246".into(),
        }
    }

    /// Restarts logind on the node and returns once it is on the bus again.
    pub async fn restart_logind(&self) -> Result<(), LogindError> {
        delegate!(self, n => n.restart_logind().await)
    }

    /// Restarts the node's system bus (and logind with it) and returns once logind is on the
    /// new bus.
    pub async fn restart_bus(&self) -> Result<(), LogindError> {
        delegate!(self, n => n.restart_bus().await)
    }

    /// Every moment the node powered off or rebooted so far: systemd's `Shutting down.`, or
    /// elogind running its power command.
    pub fn power_offs(&self) -> Vec<SystemTime> {
        match self {
            NodeLogind::Systemd(n) => n.power_offs(),
            NodeLogind::Elogind(e) => e.power_commands().into_iter().map(|(at, _)| at).collect(),
        }
    }

    /// Arms a watch for the release of `who`'s lock (see [`ReleaseWatch`]).
    pub fn watch_release(&self, who: &str, timeout: Duration) -> ReleaseWatch {
        ReleaseWatch::arm(&self.root(), &self.bus_address(), who, timeout)
    }
}
