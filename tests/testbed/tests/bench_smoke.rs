//! `testbed bench` at its smallest: every section's code on the bed, one VMI, one budget, two
//! latency runs, a fleet of two. Checks that the bench measures what it claims (who did what,
//! what the ledger says, what the report shows), never how fast anything was.

use testbed::bench::agent_build::Installed;
use testbed::bench::outcome::{self, Matrix, Tool};
use testbed::bench::{self, Report, Settings};

/// The tiny settings and the agent where its worker's user can run it (kept while in use).
fn settings() -> (Settings, Installed) {
    let agent = testbed::demo::agent_binary();
    assert!(
        agent.is_file(),
        "{} is missing: run `cargo build -p shutdown-guard` (or set TESTBED_AGENT_BIN)",
        agent.display()
    );
    let installed = Installed::new(&agent).expect("the agent is installed");
    (Settings::tiny(installed.path()), installed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_meets_the_same_shutdown_and_the_ledger_tells_them_apart() {
    let (s, _agent) = settings();
    let mut matrix = Matrix {
        params: Some(s.bound_params()),
        ..Matrix::default()
    };
    outcome::run_size(&s, 1, &mut matrix)
        .await
        .expect("the size's bed runs");
    assert!(matrix.failures.is_empty(), "{:#?}", matrix.failures);
    let cell = |t: Tool| {
        matrix
            .cells
            .iter()
            .find(|c| c.tool == t)
            .unwrap_or_else(|| panic!("no cell for {}", t.label()))
    };
    for c in &matrix.cells {
        assert_eq!(
            c.migrated + c.stopped + c.lost + c.other,
            1,
            "{}: the ledger accounts for the one VMI",
            c.tool.label()
        );
        assert!(
            c.powered_off.is_some(),
            "{}: node-1 powered off",
            c.tool.label()
        );
    }
    // No protection loses the VM; kubelet stops it; the drains migrate it.
    assert_eq!(cell(Tool::Nothing).lost, 1);
    assert!(cell(Tool::Nothing).empty.is_none());
    assert_eq!(cell(Tool::Kubelet).stopped, 1);
    assert_eq!(cell(Tool::Kubelet).migrated, 0);
    for t in [Tool::Guard, Tool::Hook, Tool::Manual] {
        let c = cell(t);
        assert_eq!(c.migrated, 1, "{}", t.label());
        assert!(
            c.requests.get("create pods/eviction").copied().unwrap_or(0) >= 1,
            "{} evicted under its own user: {:?}",
            t.label(),
            c.requests
        );
        let (empty, off) = (c.empty.expect("emptied"), c.powered_off.unwrap());
        assert!(empty <= off, "{}: empty before the power-off", t.label());
    }
    let guard = cell(Tool::Guard);
    assert!(guard.released.is_some(), "logind saw the agent's lock go");
    assert!(
        !guard.migrations.is_empty(),
        "the migration's phase times were read"
    );

    let report = Report {
        command: "testbed bench (smoke)".into(),
        settings: Some(s.clone()),
        matrix: Some(matrix),
        ..Report::default()
    };
    let md = report.markdown();
    for want in [
        "## 1. Outcome of a shutdown",
        "## 2. Time to an empty node against its lower bound",
        "| 20 s | shutdown-guard | 1 | 0 | 0 |",
        "| any | no protection | 0 | 0 | **1** |",
        "time to empty ≤ 1.1 × lower bound + 1 s",
        "kubectl drain node-1 --delete-emptydir-data",
    ] {
        assert!(md.contains(want), "report lacks {want:?}:\n{md}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latencies_and_the_idle_footprint_cover_holder_and_worker() {
    let (s, _agent) = settings();
    let (lat, idle) = bench::latency::run(&s).await.expect("latency runs");
    assert!(lat.failures.is_empty(), "{:#?}", lat.failures);
    assert_eq!(lat.release.len(), s.latency_runs);
    assert_eq!(lat.first_eviction.len(), s.latency_runs);
    assert_eq!(idle.processes, 2, "holder and worker");
    assert!(idle.memory.rss > 0 && idle.memory.pss > 0);
    assert!(
        idle.open_watches >= 1,
        "the idle agent keeps its watches open"
    );
    let md = Report {
        latencies: Some(lat),
        idle: Some(idle),
        settings: Some(s),
        ..Report::default()
    }
    .markdown();
    assert!(
        md.contains("| PrepareForShutdown → first eviction | 2 |"),
        "{md}"
    );
    assert!(md.contains("idle RSS, holder + worker"), "{md}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_is_measured_against_the_same_bed_without_agents() {
    let (s, _agent) = settings();
    let f = bench::fleet::run(&s).await.expect("the fleet runs");
    assert!(f.failures.is_empty(), "{:#?}", f.failures);
    assert_eq!(f.baseline.agents, 0);
    assert!(f.baseline.per_agent_hourly.is_empty());
    assert_eq!(f.steps.iter().map(|s| s.agents).collect::<Vec<_>>(), [1, 2]);
    for step in &f.steps {
        assert_eq!(step.per_agent_hourly.len(), step.agents);
        assert!(step.agent_watches >= step.agents, "each agent watches");
        let r = step.rolling.as_ref().expect("a rolling reboot");
        assert_eq!(r.nodes, 1);
        assert_eq!(r.drains.len(), 1, "the agent let go of its lock");
        assert_eq!(r.left_on_node, 0, "the VMIs left before the power-off");
        assert!(
            r.per_rebooted_node > 0.0,
            "the draining agent made requests"
        );
    }
    let md = Report {
        fleet: Some(f),
        settings: Some(s),
        ..Report::default()
    }
    .markdown();
    assert!(md.contains("## 5. Fleet cost"), "{md}");
}
