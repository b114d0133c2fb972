//! `testbed bench` at its smallest: one VMI, both tools, one elogind bed. Checks that the
//! bench measures what it claims (who evicted, what order things happened in, what the report
//! says), never how fast anything was.

use std::time::Duration;

use testbed::bed::LogindKind;
use testbed::bench::{self, Report, Settings, Tool};

fn settings() -> Settings {
    let agent = testbed::demo::agent_binary();
    assert!(
        agent.is_file(),
        "{} is missing: run `cargo build -p shutdown-guard` (or set SHUTDOWN_GUARD_BIN)",
        agent.display()
    );
    Settings {
        sizes: vec![1],
        reps: 1,
        latency_runs: 1,
        latency_vms: 1,
        idle: Duration::from_secs(1),
        migration: Duration::from_millis(500),
        latency_logind: LogindKind::Elogind,
        agent,
        cross_check: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_tools_drain_one_vmi_and_the_report_shows_them() {
    let s = settings();
    let runs = bench::overhead_pair(&s, 1, true)
        .await
        .expect("both drains complete on the bed");
    let tools: Vec<Tool> = runs.iter().map(|r| r.tool).collect();
    assert_eq!(tools, [Tool::Agent, Tool::Kubectl], "agent first, as asked");
    for r in &runs {
        assert!(
            r.requests.get("create pods/eviction").copied().unwrap_or(0) >= 1,
            "{} made no eviction request of its own: {:?}",
            r.tool.label(),
            r.requests
        );
        let first = r
            .first_eviction
            .expect("first eviction seen in the audit log");
        assert!(
            first >= r.started,
            "{}: eviction before the drain started",
            r.tool.label()
        );
        assert!(
            r.empty >= r.last_vmi_gone,
            "{}: node reported empty before the last VMI left ({:?} < {:?})",
            r.tool.label(),
            r.empty,
            r.last_vmi_gone
        );
    }
    // Both cordon node-1 with requests of their own user, so the counts are attributed.
    for r in &runs {
        assert!(
            r.requests.get("patch nodes").copied().unwrap_or(0) >= 1,
            "{} did not cordon node-1 under its own user: {:?}",
            r.tool.label(),
            r.requests
        );
    }

    let report = Report {
        command: "testbed bench (smoke)".into(),
        drains: runs,
        settings: Some(s),
        ..Report::default()
    };
    let md = report.markdown();
    let row = md
        .lines()
        .find(|l| l.starts_with("| 1 | 1 |"))
        .unwrap_or_else(|| panic!("no overhead row for N=1 in:\n{md}"));
    assert!(row.contains(" s ["), "overhead cells missing: {row}");
    assert!(
        md.contains("kubectl drain node-1 --delete-emptydir-data"),
        "the reference command is named"
    );
}

#[test]
fn percentiles_are_nearest_rank() {
    let v: Vec<f64> = (1..=20).map(f64::from).collect();
    assert_eq!(bench::percentile(&v, 50.0), 10.0);
    assert_eq!(bench::percentile(&v, 99.0), 20.0);
    assert_eq!(bench::percentile(&[3.0], 99.0), 3.0);
    assert!(bench::percentile(&[], 50.0).is_nan());
}
