//! KubeVirt's eviction rules as they decide a VMI's fate when its launcher pod is evicted
//! (`pkg/virt-api/webhooks/validating-webhook/admitters/pod-eviction-admitter.go`): the VMI's
//! `evictionStrategy`, else the cluster's, else None; then its `LiveMigratable` condition.
//! Shared by `check` (what will happen) and `drain --dry-run` (what would happen).

/// What decides one VMI's fate on eviction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmiFacts {
    pub key: String,
    /// `spec.evictionStrategy`.
    pub strategy: Option<String>,
    /// The `LiveMigratable` condition: status and reason.
    pub live_migratable: Option<(bool, Option<String>)>,
}

/// Where the cluster-wide strategy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterStrategy {
    /// `spec.configuration.evictionStrategy` of the KubeVirt CR.
    Configured(String),
    /// A KubeVirt CR without the setting: KubeVirt's default, None.
    Unset,
    /// No KubeVirt CR could be found (or read): KubeVirt's default, None, assumed.
    NoCr(String),
}

/// What an eviction of a VMI's launcher pod leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Migrate,
    /// The eviction is allowed (None, or LiveMigrateIfPossible without migratability).
    Stop,
    /// LiveMigrate but not migratable: KubeVirt refuses; the drain stops it gracefully.
    RefusedThenStop,
    /// Left to an external controller.
    External,
}

/// The effective strategy (the VMI's, else the cluster's, else KubeVirt's default None, as in
/// `pod-eviction-admitter.go`), where it comes from, and the VMI's fate on eviction.
pub fn fate(v: &VmiFacts, cluster: &ClusterStrategy) -> (Fate, String) {
    let (strategy, from) = match (&v.strategy, cluster) {
        (Some(s), _) => (s.clone(), "its spec".to_string()),
        (None, ClusterStrategy::Configured(s)) => (s.clone(), "the cluster default".into()),
        (None, ClusterStrategy::Unset) => (
            "None".into(),
            "KubeVirt's default (the KubeVirt CR sets none)".into(),
        ),
        (None, ClusterStrategy::NoCr(why)) => (
            "None".into(),
            format!("KubeVirt's default (no KubeVirt CR: {why})"),
        ),
    };
    let migratable = v.live_migratable.as_ref().map(|(m, _)| *m).unwrap_or(false);
    let why_not = v
        .live_migratable
        .as_ref()
        .and_then(|(_, r)| r.clone())
        .unwrap_or_else(|| "no LiveMigratable condition".into());
    match strategy.as_str() {
        "None" => (
            Fate::Stop,
            format!(
                "evictionStrategy None from {from}: the eviction is allowed and the VM shuts down"
            ),
        ),
        "LiveMigrate" if !migratable => (
            Fate::RefusedThenStop,
            format!(
                "evictionStrategy LiveMigrate from {from} but not live-migratable ({why_not}): KubeVirt refuses the eviction; the drain stops it gracefully"
            ),
        ),
        "LiveMigrateIfPossible" if !migratable => (
            Fate::Stop,
            format!(
                "LiveMigrateIfPossible from {from} but not live-migratable ({why_not}): the VM shuts down"
            ),
        ),
        "External" => (
            Fate::External,
            format!("evictionStrategy External from {from}: an external controller must move it"),
        ),
        other => (
            Fate::Migrate,
            format!("evictionStrategy {other} from {from}, live-migratable"),
        ),
    }
}
