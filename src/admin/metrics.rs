//! The agent's Prometheus metrics (OpenMetrics text on `/metrics`).
//!
//! Names follow Prometheus conventions: a `shutdown_guard_` prefix, `_total` on counters (added
//! by the encoder), base units (seconds) in the name.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::drain::report::LastShutdown;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// The shutdown type logind sent (`poweroff`, `reboot`, …), `unknown` without metadata,
    /// `on-demand` never (the CLI drain has no metrics endpoint).
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `migrated`, `stopped` or `remaining`.
    pub result: String,
}

/// Drain durations from a second to well past logind's usual maximum delays.
const DRAIN_BUCKETS: [f64; 12] = [
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 1200.0,
];

pub struct Metrics {
    registry: Registry,
    pub lock_held: Gauge,
    pub shutdowns: Family<TypeLabel, Counter>,
    pub drain_duration: Family<OutcomeLabel, Histogram>,
    pub vmis_migrated: Counter,
    pub vmis_stopped: Counter,
    pub vmis_remaining: Gauge,
    pub evictions: Family<OutcomeLabel, Counter>,
    pub deadline_reached: Counter,
    pub logind_reconnects: Counter,
    pub inhibit_delay_max: Gauge<f64, AtomicU64>,
    pub draining: Gauge,
    pub drain_budget: Gauge<f64, AtomicU64>,
    pub safety_margin: Gauge<f64, AtomicU64>,
    /// One series, labelled with the last drain's outcome: when it ended.
    pub last_drain_timestamp: Family<OutcomeLabel, Gauge<f64, AtomicU64>>,
    pub last_drain_vmis: Family<ResultLabel, Gauge>,
    /// When logind's scheduled shutdown is due, 0 without one.
    pub scheduled_shutdown: Gauge<f64, AtomicU64>,
    pub pre_draining: Gauge,
    /// 1 while the drain stops the node's VMs in place for a power event.
    pub power_event: Gauge,
    /// VMs this agent started again after a power event had stopped them.
    pub power_event_vms_restored: Counter,
    /// Power-event records dropped because the VM was changed meanwhile (the VM left alone).
    pub power_event_vms_left_alone: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shutdown_guard");
        let m = Metrics {
            lock_held: Gauge::default(),
            shutdowns: Family::default(),
            drain_duration: Family::new_with_constructor(|| Histogram::new(DRAIN_BUCKETS)),
            vmis_migrated: Counter::default(),
            vmis_stopped: Counter::default(),
            vmis_remaining: Gauge::default(),
            evictions: Family::default(),
            deadline_reached: Counter::default(),
            logind_reconnects: Counter::default(),
            inhibit_delay_max: Gauge::default(),
            draining: Gauge::default(),
            drain_budget: Gauge::default(),
            safety_margin: Gauge::default(),
            last_drain_timestamp: Family::default(),
            last_drain_vmis: Family::default(),
            scheduled_shutdown: Gauge::default(),
            pre_draining: Gauge::default(),
            power_event: Gauge::default(),
            power_event_vms_restored: Counter::default(),
            power_event_vms_left_alone: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "scheduled_shutdown_timestamp_seconds",
            "When the shutdown logind has scheduled is due (shutdown -r +N, unattended-upgrades), 0 when none is",
            m.scheduled_shutdown.clone(),
        );
        registry.register(
            "pre_draining",
            "1 while the node is drained ahead of a scheduled shutdown that has not started yet",
            m.pre_draining.clone(),
        );
        registry.register(
            "power_event",
            "1 while the node's VMs are stopped in place because too few nodes stay up to migrate to (a power event)",
            m.power_event.clone(),
        );
        registry.register(
            "power_event_vms_restored",
            "VMs this agent started again after a power event had stopped them in place",
            m.power_event_vms_restored.clone(),
        );
        registry.register(
            "power_event_vms_left_alone",
            "VMs a power event stopped that were changed before the restore, and so not started again",
            m.power_event_vms_left_alone.clone(),
        );
        registry.register(
            "lock_held",
            "1 while the logind delay inhibitor lock is held",
            m.lock_held.clone(),
        );
        registry.register(
            "shutdowns",
            "Shutdowns announced by logind, by type",
            m.shutdowns.clone(),
        );
        registry.register(
            "drain_duration_seconds",
            "From the shutdown signal to the lock's release, by outcome (empty or deadline)",
            m.drain_duration.clone(),
        );
        registry.register(
            "vmis_migrated",
            "VMIs that left the node by live migration during a drain",
            m.vmis_migrated.clone(),
        );
        registry.register(
            "vmis_stopped",
            "VMIs that stopped on the node during a drain",
            m.vmis_stopped.clone(),
        );
        registry.register(
            "vmis_remaining",
            "VMIs still running on the node during the current drain",
            m.vmis_remaining.clone(),
        );
        registry.register(
            "evictions",
            "Eviction API answers, by outcome",
            m.evictions.clone(),
        );
        registry.register(
            "deadline_reached",
            "Drains that ended at the deadline with VMIs or pods left",
            m.deadline_reached.clone(),
        );
        registry.register(
            "logind_reconnects",
            "Times the lock was taken again after logind or the bus went away",
            m.logind_reconnects.clone(),
        );
        registry.register(
            "inhibit_delay_max_seconds",
            "logind's effective InhibitDelayMaxUSec",
            m.inhibit_delay_max.clone(),
        );
        registry.register(
            "draining",
            "1 while a drain is under way",
            m.draining.clone(),
        );
        registry.register(
            "drain_budget_seconds",
            "The drain_budget setting: how long a drain may need",
            m.drain_budget.clone(),
        );
        registry.register(
            "safety_margin_seconds",
            "The safety_margin setting, taken off logind's delay to get the drain deadline",
            m.safety_margin.clone(),
        );
        // From the record on the Node, so also the drain before this boot: an alert about a
        // drain whose node went down before a scrape still fires once the node is back.
        registry.register(
            "last_drain_timestamp_seconds",
            "When the last drain recorded on the Node ended (its start if its end was never recorded), by outcome",
            m.last_drain_timestamp.clone(),
        );
        registry.register(
            "last_drain_vmis",
            "VMIs of the last drain recorded on the Node, by result (migrated, stopped, remaining)",
            m.last_drain_vmis.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn shutdown(&self, kind: Option<&str>) {
        self.shutdowns
            .get_or_create(&TypeLabel {
                r#type: kind.filter(|k| !k.is_empty()).unwrap_or("unknown").into(),
            })
            .inc();
    }

    pub fn eviction(&self, outcome: &str) {
        self.evictions
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// The last drain as recorded on the Node (outcome `draining` when its end never was).
    pub fn last_drain(&self, record: &LastShutdown) {
        let at = record
            .finished
            .as_deref()
            .unwrap_or(&record.started)
            .parse::<chrono::DateTime<chrono::Utc>>()
            .map(|t| t.timestamp_millis() as f64 / 1000.0)
            .unwrap_or(0.0);
        self.last_drain_timestamp.clear();
        self.last_drain_timestamp
            .get_or_create(&OutcomeLabel {
                outcome: record.outcome.as_str().into(),
            })
            .set(at);
        for (result, n) in [
            ("migrated", record.migrated),
            ("stopped", record.stopped),
            // VMIs only: in scope `all` the record also names pods, as `pod ns/name`.
            (
                "remaining",
                record
                    .remaining
                    .iter()
                    .filter(|r| !r.starts_with("pod "))
                    .count(),
            ),
        ] {
            self.last_drain_vmis
                .get_or_create(&ResultLabel {
                    result: result.into(),
                })
                .set(n as i64);
        }
    }

    pub fn drained(&self, outcome: &str, seconds: f64) {
        self.drain_duration
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .observe(seconds);
    }
}

/// One sample from an OpenMetrics text: the value of `name` with exactly `labels` (a
/// `k="v",…` string, empty for none). For tests and `status`.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let want = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        (series == want).then(|| value.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_and_counts() {
        let m = Metrics::new();
        m.lock_held.set(1);
        m.shutdown(Some("poweroff"));
        m.shutdown(None);
        m.eviction("evacuating");
        m.eviction("evacuating");
        m.drained("empty", 3.2);
        m.inhibit_delay_max.set(60.0);
        let t = m.encode();
        assert!(t.ends_with("# EOF\n"), "OpenMetrics ends with EOF: {t}");
        assert_eq!(sample(&t, "shutdown_guard_lock_held", ""), Some(1.0));
        assert_eq!(
            sample(&t, "shutdown_guard_shutdowns_total", "type=\"poweroff\""),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "shutdown_guard_shutdowns_total", "type=\"unknown\""),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "shutdown_guard_evictions_total",
                "outcome=\"evacuating\""
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &t,
                "shutdown_guard_drain_duration_seconds_count",
                "outcome=\"empty\""
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "shutdown_guard_inhibit_delay_max_seconds", ""),
            Some(60.0)
        );
        for family in [
            "power_event_vms_restored",
            "power_event_vms_left_alone",
            "vmis_migrated",
            "vmis_stopped",
            "vmis_remaining",
            "deadline_reached",
            "logind_reconnects",
        ] {
            assert!(
                t.contains(&format!("# TYPE shutdown_guard_{family} ")),
                "{family} missing"
            );
        }
    }

    #[test]
    fn last_drain_keeps_one_outcome_and_counts_vmis_only() {
        use crate::drain::report::ShutdownOutcome;
        let m = Metrics::new();
        let mut record = LastShutdown {
            r#type: "poweroff".into(),
            started: "2026-01-01T00:00:00Z".into(),
            finished: None,
            outcome: ShutdownOutcome::Draining,
            migrated: 0,
            stopped: 0,
            remaining: vec!["default/a".into(), "default/b".into()],
            duration_s: None,
        };
        m.last_drain(&record);
        let t = m.encode();
        // No end recorded: the start stands for it.
        assert_eq!(
            sample(
                &t,
                "shutdown_guard_last_drain_timestamp_seconds",
                "outcome=\"draining\""
            ),
            Some(1767225600.0)
        );
        record.finished = Some("2026-01-01T00:00:20Z".into());
        record.outcome = ShutdownOutcome::Deadline;
        record.migrated = 1;
        record.stopped = 2;
        record.remaining = vec!["default/b".into(), "pod default/web".into()];
        m.last_drain(&record);
        let t = m.encode();
        assert_eq!(
            sample(
                &t,
                "shutdown_guard_last_drain_timestamp_seconds",
                "outcome=\"draining\""
            ),
            None,
            "the earlier outcome's series is gone:\n{t}"
        );
        assert_eq!(
            sample(
                &t,
                "shutdown_guard_last_drain_timestamp_seconds",
                "outcome=\"deadline\""
            ),
            Some(1767225620.0)
        );
        for (result, n) in [("migrated", 1.0), ("stopped", 2.0), ("remaining", 1.0)] {
            assert_eq!(
                sample(
                    &t,
                    "shutdown_guard_last_drain_vmis",
                    &format!("result=\"{result}\"")
                ),
                Some(n),
                "{result}"
            );
        }
    }
}
