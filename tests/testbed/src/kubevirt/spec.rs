//! The `--vms` SPEC: which VMIs (or VMs) to create, of which kind, on which node.
//!
//! ```text
//! SPEC  := GROUP { "," GROUP }
//! GROUP := [ NODE ":" ] KIND "=" COUNT [ ":" MEMORY ] { "/" OPTION }
//! OPTION:= "vm=" RUNSTRATEGY | "hotplug" | "boot=" SECONDS "s"
//! ```
//!
//! `live=4:8Gi,none=1,node-2:live=1/vm=Always` asks for four LiveMigrate VMIs of 8 GiB and one
//! with strategy None on the default node, and a VirtualMachine with `runStrategy: Always` whose
//! VMI starts on node-2. VMIs are named `<kind>-<n>`, numbered per kind across groups in SPEC
//! order; a VM and its VMI share the name, as upstream's VM controller names them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::admitter::EvictionStrategy;
use super::config::{format_quantity, parse_quantity};

/// The kinds of VMI the SPEC can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmiKind {
    /// LiveMigrate, migratable.
    Live,
    /// Eviction strategy None: stops on eviction.
    None,
    /// LiveMigrate but not migratable: its eviction is refused forever.
    Stuck,
    /// LiveMigrateIfPossible, migratable.
    IfPossible,
    /// External: marked for evacuation, left to an external controller.
    External,
}

impl VmiKind {
    pub const ALL: [VmiKind; 5] = [
        Self::Live,
        Self::None,
        Self::Stuck,
        Self::IfPossible,
        Self::External,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::None => "none",
            Self::Stuck => "stuck",
            Self::IfPossible => "ifpossible",
            Self::External => "external",
        }
    }

    pub fn strategy(self) -> EvictionStrategy {
        match self {
            Self::Live | Self::Stuck => EvictionStrategy::LiveMigrate,
            Self::None => EvictionStrategy::None,
            Self::IfPossible => EvictionStrategy::LiveMigrateIfPossible,
            Self::External => EvictionStrategy::External,
        }
    }

    pub fn migratable(self) -> bool {
        self != Self::Stuck
    }
}

/// `spec.runStrategy` of a VirtualMachine (`staging/src/kubevirt.io/api/core/v1/types.go`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunStrategy {
    Always,
    RerunOnFailure,
    Manual,
    Halted,
}

impl RunStrategy {
    pub const ALL: [RunStrategy; 4] = [
        Self::Always,
        Self::RerunOnFailure,
        Self::Manual,
        Self::Halted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::RerunOnFailure => "RerunOnFailure",
            Self::Manual => "Manual",
            Self::Halted => "Halted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether the VM controller starts a VMI for a new VM on its own.
    pub fn starts_on_creation(self) -> bool {
        matches!(self, Self::Always | Self::RerunOnFailure)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "VM spec entry {0:?} is not [NODE:]KIND=COUNT[:MEMORY][/OPTION…] (e.g. live=3,none=1,node-2:live=1:8Gi/vm=Always)"
    )]
    Syntax(String),
    #[error("unknown VM kind {0:?}; known kinds: live, none, stuck, ifpossible, external")]
    UnknownKind(String),
    #[error("count {count:?} for {kind} is not a non-negative integer")]
    Count { kind: String, count: String },
    #[error("VM kind {0} is listed twice for the same node")]
    Duplicate(String),
    #[error("memory {memory:?} for {kind}: {reason}")]
    Memory {
        kind: String,
        memory: String,
        reason: String,
    },
    #[error(
        "option {0:?}: known options are vm=Always|RerunOnFailure|Manual|Halted, hotplug and boot=SECONDSs (e.g. boot=30s)"
    )]
    Option(String),
    #[error("node {0:?} in the VM spec is not a node name (e.g. node-2)")]
    Node(String),
}

/// One `KIND=COUNT…` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmGroup {
    /// Where its VMIs start; `None`: the node given to `create_vmis`.
    pub node: Option<String>,
    pub kind: VmiKind,
    pub count: u32,
    /// Guest memory (`spec.domain.resources.requests.memory`) in bytes; `None`: 128 MiB.
    pub memory: Option<u64>,
    /// VMIs owned by VirtualMachines with this run strategy; `None`: bare VMIs.
    pub vm: Option<RunStrategy>,
    /// Each VMI asks for a hotplugged volume, so it gets an attachment pod.
    pub hotplug: bool,
    /// How long each VMI boots (Scheduled → Running); `None`: the simulator's default.
    /// `create_vmis` waits for such VMIs only until they are scheduled, so a test can meet
    /// them booting.
    pub boot: Option<Duration>,
}

/// One VMI (or VM) the SPEC asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInstance<'a> {
    pub name: String,
    pub group: &'a VmGroup,
}

/// The groups of a `--vms` SPEC, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmSpec {
    pub groups: Vec<VmGroup>,
}

impl VmSpec {
    pub fn total(&self) -> u32 {
        self.groups.iter().map(|g| g.count).sum()
    }

    /// Every VMI with its group, named `<kind>-<n>` counting from 1 per kind in SPEC order.
    pub fn instances(&self) -> Vec<VmInstance<'_>> {
        let mut next = std::collections::HashMap::<VmiKind, u32>::new();
        let mut out = Vec::new();
        for group in &self.groups {
            for _ in 0..group.count {
                let n = next.entry(group.kind).or_insert(0);
                *n += 1;
                out.push(VmInstance {
                    name: format!("{}-{n}", group.kind.key()),
                    group,
                });
            }
        }
        out
    }

    /// `(kind, name)` of every VMI.
    pub fn names(&self) -> Vec<(VmiKind, String)> {
        self.instances()
            .into_iter()
            .map(|i| (i.group.kind, i.name))
            .collect()
    }

    /// How many VMIs of `kind` the SPEC asks for, on any node.
    pub fn count(&self, kind: VmiKind) -> u32 {
        self.groups
            .iter()
            .filter(|g| g.kind == kind)
            .map(|g| g.count)
            .sum()
    }
}

fn valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn parse_group(entry: &str) -> Result<VmGroup, SpecError> {
    let (head, tail) = entry
        .split_once('=')
        .ok_or_else(|| SpecError::Syntax(entry.to_owned()))?;
    let (node, kind) = match head.rsplit_once(':') {
        Some((node, kind)) => {
            let node = node.trim();
            if !valid_node_name(node) {
                return Err(SpecError::Node(node.to_owned()));
            }
            (Some(node.to_owned()), kind.trim())
        }
        None => (None, head.trim()),
    };
    let parsed = VmiKind::ALL
        .into_iter()
        .find(|k| k.key().eq_ignore_ascii_case(kind))
        .ok_or_else(|| SpecError::UnknownKind(kind.to_owned()))?;
    let mut parts = tail.split('/');
    let sizing = parts.next().unwrap_or_default();
    let (count, memory) = match sizing.split_once(':') {
        Some((c, m)) => (c.trim(), Some(m.trim())),
        None => (sizing.trim(), None),
    };
    let count = count.parse::<u32>().map_err(|_| SpecError::Count {
        kind: kind.to_owned(),
        count: count.to_owned(),
    })?;
    let memory = match memory {
        None => None,
        Some(m) => {
            let bytes = parse_quantity(m).map_err(|e| SpecError::Memory {
                kind: kind.to_owned(),
                memory: m.to_owned(),
                reason: e.to_string(),
            })?;
            if bytes == 0 {
                return Err(SpecError::Memory {
                    kind: kind.to_owned(),
                    memory: m.to_owned(),
                    reason: "a VM needs some memory".into(),
                });
            }
            Some(bytes)
        }
    };
    let mut group = VmGroup {
        node,
        kind: parsed,
        count,
        memory,
        vm: None,
        hotplug: false,
        boot: None,
    };
    for option in parts.map(str::trim) {
        if option == "hotplug" {
            group.hotplug = true;
        } else if let Some(strategy) = option.strip_prefix("vm=") {
            group.vm =
                Some(RunStrategy::parse(strategy).ok_or_else(|| SpecError::Option(option.into()))?);
        } else if let Some(secs) = option.strip_prefix("boot=") {
            let secs = secs
                .strip_suffix('s')
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| SpecError::Option(option.into()))?;
            group.boot = Some(Duration::from_secs_f64(secs));
        } else {
            return Err(SpecError::Option(option.to_owned()));
        }
    }
    Ok(group)
}

impl FromStr for VmSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut groups: Vec<VmGroup> = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let group = parse_group(entry)?;
            if groups
                .iter()
                .any(|g| g.kind == group.kind && g.node == group.node)
            {
                let key = match &group.node {
                    Some(n) => format!("{n}:{}", group.kind.key()),
                    None => group.kind.key().to_owned(),
                };
                return Err(SpecError::Duplicate(key));
            }
            groups.push(group);
        }
        Ok(Self { groups })
    }
}

impl fmt::Display for VmGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(node) = &self.node {
            write!(f, "{node}:")?;
        }
        write!(f, "{}={}", self.kind.key(), self.count)?;
        if let Some(m) = self.memory {
            write!(f, ":{}", format_quantity(m))?;
        }
        if let Some(vm) = self.vm {
            write!(f, "/vm={}", vm.as_str())?;
        }
        if self.hotplug {
            f.write_str("/hotplug")?;
        }
        if let Some(boot) = self.boot {
            write!(f, "/boot={}s", boot.as_secs_f64())?;
        }
        Ok(())
    }
}

impl fmt::Display for VmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.groups.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_counts_and_names() {
        let spec: VmSpec = "live=3,none=1,stuck=1,ifpossible=1,external=1"
            .parse()
            .unwrap();
        assert_eq!(spec.total(), 7);
        assert_eq!(spec.count(VmiKind::Live), 3);
        let names: Vec<String> = spec.names().into_iter().map(|(_, n)| n).collect();
        assert_eq!(names[..3], ["live-1", "live-2", "live-3"]);
        assert_eq!(
            spec.to_string(),
            "live=3,none=1,stuck=1,ifpossible=1,external=1"
        );
        assert_eq!("".parse::<VmSpec>().unwrap().total(), 0);
    }

    #[test]
    fn groups_carry_node_memory_and_options() {
        let spec: VmSpec = "live=4:8Gi,none=1,node-2:live=1/vm=Always/hotplug/boot=30s"
            .parse()
            .unwrap();
        assert_eq!(spec.groups.len(), 3);
        assert_eq!(spec.groups[0].memory, Some(8 << 30));
        assert_eq!(spec.groups[0].node, None);
        let remote = &spec.groups[2];
        assert_eq!(remote.node.as_deref(), Some("node-2"));
        assert_eq!(remote.vm, Some(RunStrategy::Always));
        assert!(remote.hotplug);
        assert_eq!(remote.boot, Some(Duration::from_secs(30)));
        // Numbering continues per kind across groups, so names stay unique.
        let names: Vec<String> = spec.instances().into_iter().map(|i| i.name).collect();
        assert_eq!(
            names,
            ["live-1", "live-2", "live-3", "live-4", "none-1", "live-5"]
        );
        assert_eq!(
            spec.to_string(),
            "live=4:8Gi,none=1,node-2:live=1/vm=Always/hotplug/boot=30s"
        );
        assert_eq!(spec.to_string().parse::<VmSpec>().unwrap(), spec);
    }

    #[test]
    fn spec_errors_are_clear() {
        assert_eq!(
            "live3".parse::<VmSpec>(),
            Err(SpecError::Syntax("live3".into()))
        );
        assert_eq!(
            "fast=1".parse::<VmSpec>(),
            Err(SpecError::UnknownKind("fast".into()))
        );
        assert!(matches!(
            "live=x".parse::<VmSpec>(),
            Err(SpecError::Count { .. })
        ));
        assert!(matches!(
            "live=-1".parse::<VmSpec>(),
            Err(SpecError::Count { .. })
        ));
        assert_eq!(
            "live=1,live=2".parse::<VmSpec>(),
            Err(SpecError::Duplicate("live".into()))
        );
        assert_eq!(
            "node-2:live=1,node-2:live=2".parse::<VmSpec>(),
            Err(SpecError::Duplicate("node-2:live".into()))
        );
        assert!("live=1,node-2:live=2".parse::<VmSpec>().is_ok());
        assert!(matches!(
            "live=1:8GB".parse::<VmSpec>(),
            Err(SpecError::Memory { .. })
        ));
        assert!(matches!(
            "live=1:0".parse::<VmSpec>(),
            Err(SpecError::Memory { .. })
        ));
        assert_eq!(
            "live=1/vm=Sometimes".parse::<VmSpec>(),
            Err(SpecError::Option("vm=Sometimes".into()))
        );
        assert_eq!(
            "live=1/boot=5".parse::<VmSpec>(),
            Err(SpecError::Option("boot=5".into()))
        );
        assert_eq!(
            "Node_2:live=1".parse::<VmSpec>(),
            Err(SpecError::Node("Node_2".into()))
        );
        assert!(
            SpecError::UnknownKind("fast".into())
                .to_string()
                .contains("live, none, stuck, ifpossible, external")
        );
    }
}
