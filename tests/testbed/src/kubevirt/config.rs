//! The KubeVirt CR (`kubevirts.kubevirt.io`, `kubevirt/kubevirt`) and the cluster configuration
//! the simulated controllers read from it, as virt-controller reads `ClusterConfig`
//! (`pkg/virt-config/virt-config.go`, v1.8.0: defaults `ParallelMigrationsPerClusterDefault` 5,
//! `ParallelOutboundMigrationsPerNodeDefault` 2, `BandwidthPerMigrationDefault` "0Mi" (no
//! limit), `MigrationProgressTimeout` 150 s, `MigrationCompletionTimeoutPerGiB` 150 s; the
//! unschedulable target pod timeout 300 s and the drain taint `kubevirt.io/drain` from
//! `pkg/virt-config/configuration.go`).
//!
//! The simulator writes the CR from [`super::KubeVirtOptions`] at start and then follows it, so
//! a test can change `spec.configuration` at run time as an administrator would.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::CustomResource;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::admitter::EvictionStrategy;
use super::version::{GateState, KubeVirtVersion};

pub const NAMESPACE: &str = "kubevirt";
pub const NAME: &str = "kubevirt";
pub const PRIORITY_QUEUE_GATE: &str = "MigrationPriorityQueue";

/// `KubeVirt` (`kubevirt.io/v1`); the spec is kept as JSON and read through [`ClusterConfig`].
#[derive(CustomResource, Clone, Debug, Default, Serialize, Deserialize)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "KubeVirt",
    namespaced,
    status = "Value",
    schema = "disabled",
    shortname = "kv",
    plural = "kubevirts"
)]
pub struct KubeVirtSpec {
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a quantity: give bytes with an optional suffix (Ki, Mi, Gi, Ti, k, M, G, T), e.g. 8Gi"
)]
pub struct BadQuantity(pub String);

/// A Kubernetes resource quantity of bytes (`8Gi`, `500M`, `1024`), rounded down to a byte.
pub fn parse_quantity(s: &str) -> Result<u64, BadQuantity> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        _ => return Err(BadQuantity(s.to_owned())),
    };
    let value: f64 = number.parse().map_err(|_| BadQuantity(s.to_owned()))?;
    if !value.is_finite() || value < 0.0 {
        return Err(BadQuantity(s.to_owned()));
    }
    Ok((value * factor) as u64)
}

/// Bytes as the shortest exact binary quantity (`8Gi`, `300Mi`, `1234`).
pub fn format_quantity(bytes: u64) -> String {
    for (suffix, unit) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// `spec.configuration.migrations`, with upstream's defaults for what is not set.
#[derive(Clone, Debug, PartialEq)]
pub struct MigrationConfig {
    pub parallel_migrations_per_cluster: u32,
    pub parallel_outbound_migrations_per_node: u32,
    /// Bytes per second one migration may use; `None` for upstream's "0Mi", no limit.
    pub bandwidth_per_migration: Option<u64>,
    /// Seconds per GiB of guest memory (rounded up, `getVMIMigrationDataSize`) a migration may
    /// take before virt-launcher aborts it.
    pub completion_timeout_per_gib: u64,
    /// Seconds without progress after which virt-launcher aborts a migration.
    pub progress_timeout: u64,
    /// How long a target pod may stay unschedulable before the migration fails.
    pub unschedulable_pending_timeout: Duration,
    pub node_drain_taint_key: String,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            parallel_migrations_per_cluster: 5,
            parallel_outbound_migrations_per_node: 2,
            bandwidth_per_migration: None,
            completion_timeout_per_gib: 150,
            progress_timeout: 150,
            unschedulable_pending_timeout: Duration::from_secs(300),
            node_drain_taint_key: "kubevirt.io/drain".into(),
        }
    }
}

/// What the simulated controllers read from the KubeVirt CR.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterConfig {
    pub migrations: MigrationConfig,
    /// `developerConfiguration.featureGates`.
    pub feature_gates: Vec<String>,
    /// `evictionStrategy`; upstream leaves it unset, which counts as None.
    pub eviction_strategy: Option<EvictionStrategy>,
}

impl ClusterConfig {
    /// Reads `spec.configuration` of a KubeVirt CR; unknown or malformed fields fall back to
    /// the defaults, as virt-config does for values the API would have rejected.
    pub fn from_spec(spec: &Value) -> Self {
        let conf = &spec["configuration"];
        let m = &conf["migrations"];
        let d = MigrationConfig::default();
        let uint = |v: &Value, default: u64| v.as_u64().unwrap_or(default);
        let migrations = MigrationConfig {
            parallel_migrations_per_cluster: uint(
                &m["parallelMigrationsPerCluster"],
                d.parallel_migrations_per_cluster.into(),
            ) as u32,
            parallel_outbound_migrations_per_node: uint(
                &m["parallelOutboundMigrationsPerNode"],
                d.parallel_outbound_migrations_per_node.into(),
            ) as u32,
            bandwidth_per_migration: match &m["bandwidthPerMigration"] {
                Value::String(s) => parse_quantity(s).ok().filter(|b| *b > 0),
                Value::Number(n) => n.as_u64().filter(|b| *b > 0),
                _ => None,
            },
            completion_timeout_per_gib: uint(
                &m["completionTimeoutPerGiB"],
                d.completion_timeout_per_gib,
            ),
            progress_timeout: uint(&m["progressTimeout"], d.progress_timeout),
            unschedulable_pending_timeout: Duration::from_secs(uint(
                &m["unschedulablePendingTimeoutSeconds"],
                d.unschedulable_pending_timeout.as_secs(),
            )),
            node_drain_taint_key: m["nodeDrainTaintKey"]
                .as_str()
                .unwrap_or(&d.node_drain_taint_key)
                .to_owned(),
        };
        let feature_gates = conf["developerConfiguration"]["featureGates"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            migrations,
            feature_gates,
            eviction_strategy: conf["evictionStrategy"]
                .as_str()
                .and_then(EvictionStrategy::parse),
        }
    }

    /// `MigrationPriorityQueueEnabled`: GA, or listed while the release knows the gate.
    pub fn priority_queue_enabled(&self, version: KubeVirtVersion) -> bool {
        match version.priority_queue_gate() {
            None => false,
            Some(GateState::Ga) => true,
            Some(_) => self.feature_gates.iter().any(|g| g == PRIORITY_QUEUE_GATE),
        }
    }

    /// The CR's `spec` for this configuration.
    pub fn to_spec(&self) -> Value {
        let m = &self.migrations;
        let mut conf = json!({
            "migrations": {
                "parallelMigrationsPerCluster": m.parallel_migrations_per_cluster,
                "parallelOutboundMigrationsPerNode": m.parallel_outbound_migrations_per_node,
                // Upstream writes its "no limit" default as "0Mi".
                "bandwidthPerMigration": m.bandwidth_per_migration.map_or("0Mi".to_owned(), format_quantity),
                "completionTimeoutPerGiB": m.completion_timeout_per_gib,
                "progressTimeout": m.progress_timeout,
                "unschedulablePendingTimeoutSeconds": m.unschedulable_pending_timeout.as_secs(),
                "nodeDrainTaintKey": m.node_drain_taint_key,
            },
            "developerConfiguration": {"featureGates": self.feature_gates},
        });
        if let Some(s) = self.eviction_strategy {
            conf["evictionStrategy"] = json!(s.as_str());
        }
        json!({"configuration": conf, "workloadUpdateStrategy": {}, "certificateRotateStrategy": {}})
    }
}

/// The CR as virt-operator's users write it.
pub fn manifest(config: &ClusterConfig) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1", "kind": "KubeVirt",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": config.to_spec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("8Gi"), Ok(8 << 30));
        assert_eq!(parse_quantity("0Mi"), Ok(0));
        assert_eq!(parse_quantity("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_quantity("500M"), Ok(500_000_000));
        assert_eq!(parse_quantity("1024"), Ok(1024));
        assert!(parse_quantity("8GB").is_err());
        assert!(parse_quantity("-1Gi").is_err());
        assert!(
            parse_quantity("x")
                .unwrap_err()
                .to_string()
                .contains("e.g. 8Gi")
        );
        assert_eq!(format_quantity(8 << 30), "8Gi");
        assert_eq!(format_quantity(0), "0");
        assert_eq!(format_quantity(300 << 20), "300Mi");
    }

    #[test]
    fn defaults_are_upstreams() {
        let c = ClusterConfig::from_spec(&json!({}));
        assert_eq!(c.migrations.parallel_migrations_per_cluster, 5);
        assert_eq!(c.migrations.parallel_outbound_migrations_per_node, 2);
        assert_eq!(c.migrations.bandwidth_per_migration, None);
        assert_eq!(c.migrations.completion_timeout_per_gib, 150);
        assert_eq!(c.migrations.progress_timeout, 150);
        assert_eq!(c.eviction_strategy, None);
    }

    #[test]
    fn spec_round_trips() {
        let c = ClusterConfig {
            migrations: MigrationConfig {
                parallel_outbound_migrations_per_node: 1,
                bandwidth_per_migration: Some(64 << 20),
                progress_timeout: 7,
                ..MigrationConfig::default()
            },
            feature_gates: vec![PRIORITY_QUEUE_GATE.into()],
            eviction_strategy: Some(EvictionStrategy::LiveMigrate),
        };
        assert_eq!(ClusterConfig::from_spec(&c.to_spec()), c);
        assert_eq!(
            c.to_spec()["configuration"]["migrations"]["bandwidthPerMigration"],
            "64Mi"
        );
    }

    #[test]
    fn priority_queue_needs_the_gate_listed_and_a_release_that_knows_it() {
        let listed = ClusterConfig {
            feature_gates: vec![PRIORITY_QUEUE_GATE.into()],
            ..ClusterConfig::default()
        };
        let unlisted = ClusterConfig::default();
        for v in [KubeVirtVersion::V1_7, KubeVirtVersion::V1_8] {
            assert!(listed.priority_queue_enabled(v));
            assert!(
                !unlisted.priority_queue_enabled(v),
                "beta gates are off unless listed"
            );
        }
        assert!(!listed.priority_queue_enabled(KubeVirtVersion::V1_6));
    }
}
