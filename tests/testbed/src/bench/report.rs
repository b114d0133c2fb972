//! BENCHMARKS.md from what one run measured. Every target is reported met or missed, never
//! asserted.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

use super::agent_build::{AgentBuild, rel};
use super::audit;
use super::bound::within_target;
use super::fleet::{Fleet, Step};
use super::latency::{Idle, Latencies, PARTS};
use super::outcome::{Cell, Matrix, Tool};
use super::procfs::Load;
use super::stats::{median, mib, min_max, ms, percentile, secs};
use super::{KUBECTL_DRAIN_FLAGS, Settings, mix};
use crate::timeline::secs_between;

/// Everything one `testbed bench` measured.
#[derive(Debug, Default)]
pub struct Report {
    pub command: String,
    pub started: Option<DateTime<Utc>>,
    pub took: Duration,
    pub machine: String,
    /// The machine's load at the start and the end of the run.
    pub load: Load,
    pub build: Option<AgentBuild>,
    /// `(tar bytes, tar.gz bytes)` of the image's one layer.
    pub image: Option<(u64, u64)>,
    pub settings: Option<Settings>,
    pub matrix: Option<Matrix>,
    pub latencies: Option<Latencies>,
    pub idle: Option<Idle>,
    pub fleet: Option<Fleet>,
    pub errors: Vec<String>,
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn opt_secs(x: Option<f64>) -> String {
    x.map_or("–".into(), secs)
}

fn pct(share: f64) -> String {
    if share.is_nan() {
        "–".into()
    } else {
        format!("{:.3} %", 100.0 * share)
    }
}

/// Where a drain's time went, from its migrations' phase times.
#[derive(Clone, Debug, Default)]
pub struct Breakdown {
    /// Shutdown request → first migration admitted.
    pub start: f64,
    /// Mean migration time (admitted → ended) against the bound's model.
    pub mean_actual: f64,
    pub mean_model: f64,
    /// Share of the slots busy from the first admission to the last end.
    pub utilisation: f64,
    /// Last migration end → node empty (negative: the VMI left at its hand-over, before the
    /// migration's end).
    pub tail: f64,
}

/// Why the pace of the first evictions matters with many VMIs, and how the agent sets it, as read in
/// KubeVirt v1.8.0's controllers and in the audit log of the cells.
const PACING: &str = "*Why the pace of the first evictions matters with many VMIs* (read in \
KubeVirt v1.8.0 and in the cells' audit log). The evacuation controller \
(`pkg/virt-controller/watch/drain/evacuation/evacuation.go`) creates migrations for node-1 \
while it counts fewer than 2 *running* outbound migrations, and otherwise re-queues node-1 \
after 5 s; a finishing migration does not wake node-1 up (migration and VMI events enqueue the \
VMI's current node, after the hand-over the target). A burst of evictions marks every VMI \
within half a second and wakes the controller once: it creates 2 migrations, then 2 more per \
5 s tick (measured with shutdown-guard before it paced its evictions: 45 migrations in 106 s, \
node-1 empty after 114 s at N = 50, 300 s). Evictions spread out wake it once each, and since \
it does not count migrations still `Pending`, each wake creates more; those wait in the \
migration controller (`pkg/virt-controller/watch/migration/migration.go`), each re-checking \
for a free slot every 5 s on its own clock, so a freed slot is taken sooner than by the node's \
single tick. `kubectl drain` gets this from client-go's rate limit (about 5 requests/s after a \
burst of 10). shutdown-guard does it on purpose: the first eviction of each VMI that may \
migrate waits for the answer to the previous one and, after an evacuation (429), 200 ms more; \
an eviction KubeVirt lets through (strategy None) is followed at once, and VMIs KubeVirt has \
found not migratable are evicted without waiting. What is left is KubeVirt's: a pending \
migration looks for a free slot every 5 s, so a slot a finishing migration frees stays idle \
until the next look, the longer the fewer migrations still wait; with the \
`MigrationPriorityQueue` feature gate (alpha in 1.7, beta in 1.8, off unless enabled) a \
finishing migration wakes the pending ones at once.\n";

pub fn breakdown(cell: &Cell, s: &Settings) -> Option<Breakdown> {
    let p = s.bound_params();
    let spans: Vec<(SystemTime, SystemTime)> = cell
        .migrations
        .iter()
        .filter(|m| m.succeeded)
        .filter_map(|m| Some((m.admitted?, m.ended?)))
        .collect();
    if spans.is_empty() {
        return None;
    }
    let first = spans.iter().map(|s| s.0).min()?;
    let last = spans.iter().map(|s| s.1).max()?;
    let busy: f64 = spans.iter().map(|(a, b)| secs_between(*a, *b)).sum();
    let live = mix::vms(cell.n)
        .into_iter()
        .filter(|v| v.kind == crate::kubevirt::VmiKind::Live)
        .collect::<Vec<_>>();
    let model: f64 = live
        .iter()
        .map(|v| (p.fixed + mix::copy_time(v.memory, p.bandwidth)).as_secs_f64())
        .sum::<f64>()
        / live.len().max(1) as f64;
    Some(Breakdown {
        start: secs_between(cell.requested, first),
        mean_actual: busy / spans.len() as f64,
        mean_model: model,
        utilisation: busy / (p.slots as f64 * secs_between(first, last)).max(1e-9),
        tail: cell.empty.map_or(f64::NAN, |e| secs_between(last, e)),
    })
}

impl Report {
    /// The whole report as Markdown.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        self.header(&mut o);
        self.summary(&mut o);
        self.outcome_section(&mut o);
        self.bound_section(&mut o);
        self.latency_section(&mut o);
        self.footprint_section(&mut o);
        self.fleet_section(&mut o);
        self.limits_section(&mut o);
        o
    }

    fn header(&self, o: &mut String) {
        let when = self
            .started
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_default();
        let _ = writeln!(o, "# Benchmarks\n");
        let _ = writeln!(
            o,
            "Produced by `{}` on {when} in {:.0} min, on {}. Load average (1, 5, 15 min) at the \
             start {}, at the end {}; each section below gives its own.\n",
            self.command,
            self.took.as_secs_f64() / 60.0,
            self.machine,
            self.load.before,
            self.load.after
        );
        if let Some(s) = &self.settings
            && s.quick
        {
            let _ = writeln!(
                o,
                "**A development run (`--quick`): small sizes, one budget, short windows. Not \
                 the figures to quote.**\n"
            );
        }
        if let Some(b) = &self.build {
            let _ = writeln!(
                o,
                "**Agent binary**: `{}`, {:.1} MiB, git revision `{}`, built by {} in {:.0} s \
                 with the workspace's `[profile.release]` ({}), the profile the image ships. \
                 Every section uses this one binary.\n",
                rel(&b.binary),
                b.size as f64 / (1024.0 * 1024.0),
                b.revision,
                b.built_by,
                b.took.as_secs_f64(),
                b.profile.join(", ")
            );
        }
        if let Some(s) = &self.settings {
            let kv = s.kubevirt();
            let cfg = kv.cluster_config().migrations;
            let p = s.bound_params();
            let _ = writeln!(
                o,
                "**The bed**: real etcd, kube-apiserver, kube-controller-manager and \
                 kube-scheduler; simulated kubelets; KubeVirt {} simulated as upstream runs it \
                 (`parallelOutboundMigrationsPerNode` {}, `parallelMigrationsPerCluster` {}, the \
                 evacuation controller re-queueing a full node after 5 s, no \
                 `bandwidthPerMigration` cap, upstream's timeouts); node-1 runs systemd 257 as \
                 its init (a real logind and a real shutdown).\n",
                kv.version,
                cfg.parallel_outbound_migrations_per_node,
                cfg.parallel_migrations_per_cluster,
            );
            let _ = writeln!(
                o,
                "**VMs**: {}. A migration copies the guest memory at {:.0} GiB/s and spends \
                 {:.2} s in its other phases (target pod, preparation, hand-over); a VM stops \
                 (ACPI) in {:.0} s once its launcher gets SIGTERM; launcher pods have upstream's \
                 grace period (VMI 30 s + 30 s padding).\n",
                mix::describe(),
                s.bandwidth as f64 / (1u64 << 30) as f64,
                p.fixed.as_secs_f64(),
                s.stop.as_secs_f64()
            );
            let _ = writeln!(
                o,
                "**Scale, honestly**: {:.0} GiB/s per migration is about {:.0}× what one \
                 migration gets on a 10 GbE link (~1 GiB/s), and real guests dirty memory while \
                 it is copied, so real migrations of these VMs take {:.0}× as long or more. The \
                 budgets are *not* scaled: a cell here is as hard as a real cell with {:.0}× the \
                 budget. The fixed 5 s re-queue of KubeVirt and the VM stop time do not scale \
                 either. What carries over is the ratio to the lower bound and which cells lose \
                 VMs, not the seconds.\n",
                s.bandwidth as f64 / (1u64 << 30) as f64,
                s.bandwidth as f64 / (1u64 << 30) as f64,
                s.bandwidth as f64 / (1u64 << 30) as f64,
                s.bandwidth as f64 / (1u64 << 30) as f64,
            );
        }
        for e in &self.errors {
            let _ = writeln!(o, "- section failed: {e}");
        }
    }

    fn guard_cells(&self) -> Vec<&Cell> {
        self.matrix
            .as_ref()
            .map(|m| m.cells.iter().filter(|c| c.tool == Tool::Guard).collect())
            .unwrap_or_default()
    }

    /// A cell whose budget leaves the agent enough time: deadline (budget − 5 s margin) at
    /// least the lower bound.
    fn budget_suffices(c: &Cell) -> bool {
        c.budget as f64 - 5.0 >= c.bound.total
    }

    fn summary(&self, o: &mut String) {
        let _ = writeln!(o, "## Targets\n");
        let _ = writeln!(o, "| target | result | |");
        let _ = writeln!(o, "|---|---|---|");
        let guard = self.guard_cells();
        if !guard.is_empty() {
            let enough: Vec<&&Cell> = guard.iter().filter(|c| Self::budget_suffices(c)).collect();
            let lost_enough: usize = enough.iter().map(|c| c.lost).sum();
            let lost_short: usize = guard
                .iter()
                .filter(|c| !Self::budget_suffices(c))
                .map(|c| c.lost)
                .sum();
            let _ = writeln!(
                o,
                "| 0 VMs lost by shutdown-guard where the budget covers the lower bound | {lost_enough} lost in {} cells | {} |",
                enough.len(),
                met(lost_enough == 0)
            );
            let _ = writeln!(
                o,
                "| where it does not: only graceful stops, none lost | {lost_short} lost in {} cells | {} |",
                guard.len() - enough.len(),
                met(lost_short == 0)
            );
            let timed: Vec<(f64, f64)> = enough
                .iter()
                .filter_map(|c| Some((c.time_to_empty()?, c.bound.total)))
                .collect();
            let within = timed.iter().filter(|(t, b)| within_target(*t, *b)).count();
            let _ = writeln!(
                o,
                "| time to empty ≤ 1.1 × lower bound + 1 s | {within} of {} cells (section 2) | {} |",
                timed.len(),
                met(!timed.is_empty() && within == timed.len())
            );
        }
        if let Some(l) = &self.latencies {
            for (name, v) in [
                ("first eviction p99 ≤ 20 ms", &l.first_eviction),
                ("release p99 ≤ 20 ms", &l.release),
            ] {
                let p99 = percentile(v, 99.0);
                let _ = writeln!(
                    o,
                    "| {name} | {} over {} runs | {} |",
                    ms(p99),
                    v.len(),
                    met(p99 <= 0.020)
                );
            }
        }
        if let Some(i) = &self.idle {
            let _ = writeln!(
                o,
                "| idle RSS ≤ 16 MiB, all agent processes together | {} ({} processes; PSS {}) | {} |",
                mib(i.memory.rss),
                i.processes,
                mib(i.memory.pss),
                met(i.memory.rss <= 16 * 1024)
            );
        }
        if let Some(step) = self.fleet.as_ref().and_then(|f| f.steps.last()) {
            let hourly = percentile(&step.per_agent_hourly, 50.0);
            let worst = min_max(&step.per_agent_hourly).1;
            let _ = writeln!(
                o,
                "| idle ≤ 30 API requests per hour per agent | median {hourly:.1}, max {worst:.1} ({} agents, {} s) | {} |",
                step.agents,
                step.window.as_secs(),
                met(worst <= 30.0)
            );
            let cpu = min_max(&step.agent_cpu).1;
            let _ = writeln!(
                o,
                "| idle CPU under 0.1 % of a core | median {}, max {} ({} agents, {} s) | {} |",
                pct(median(&step.agent_cpu)),
                pct(cpu),
                step.agents,
                step.window.as_secs(),
                met(cpu < 0.001)
            );
        }
        if let Some(c) = self.drain_footprint_cell() {
            let f = c.footprint.as_ref().expect("filtered");
            let _ = writeln!(
                o,
                "| draining: under 1 % of a core (apart from the first second) | {} over {:.0} s, {} VMIs | {} |",
                pct(f.cpu_share),
                f.window,
                c.n,
                met(f.cpu_share < 0.01)
            );
        }
        let _ = writeln!(o);
    }

    /// The largest shutdown-guard drain that measured the agent's footprint (the largest
    /// size, the largest budget).
    fn drain_footprint_cell(&self) -> Option<&Cell> {
        self.guard_cells()
            .into_iter()
            .filter(|c| c.footprint.as_ref().is_some_and(|f| f.window > 0.0))
            .max_by_key(|c| (c.n, c.budget))
    }

    fn outcome_section(&self, o: &mut String) {
        let Some(m) = &self.matrix else { return };
        let _ = writeln!(o, "## 1. Outcome of a shutdown\n");
        let _ = writeln!(
            o,
            "Each cell: node-1 (systemd) carries N fresh VMIs of the mix in a namespace of their \
             own, logind's `InhibitDelayMaxSec` is the budget, and `systemctl poweroff` starts \
             the shutdown (manual: the drain starts, the power-off follows when it ends). Then \
             node-1 boots again for the next cell. Counts come from the VM ledger (watches \
             and the audit log, never the tools): *migrated*, *stopped* (the VM shut down \
             gracefully, `Succeeded`), *lost* (still running on node-1 when it powered off, or \
             killed without grace). *Empty*: the shutdown request → the last VMI gone from \
             node-1, when none stayed. *Power-off*: the request → systemd's `Shutting down.` on \
             node-1's console.\n"
        );
        let _ = writeln!(
            o,
            "The tools: **shutdown-guard** (`shutdown-guard run` as a pod on node-1: holder and \
             worker); **kubelet graceful node shutdown** (simulated after kubelet's \
             `pkg/kubelet/nodeshutdown/nodeshutdown_manager_linux.go`: its own delay lock, \
             pods killed on the node at `PrepareForShutdown`, no eviction; \
             `shutdownGracePeriod` = the budget, `shutdownGracePeriodCriticalPods` = 10 s); \
             **`kubectl drain` in a shutdown hook** (a unit in node-1's systemd, \
             `ExecStop=kubectl drain node-1 {flags}`, `After=kubelet.service \
             network-online.target`, `TimeoutStopSec=` the budget); **manual** (`kubectl drain \
             node-1 {flags}` from outside, then `systemctl poweroff`); **no protection** \
             (`systemctl poweroff`). The manual procedure has no deadline and no protection \
             nothing to bound: each runs once per size, whatever the budget.\n",
            flags = KUBECTL_DRAIN_FLAGS.join(" ")
        );
        let mut sizes: Vec<usize> = m.cells.iter().map(|c| c.n).collect();
        sizes.sort();
        sizes.dedup();
        for n in sizes {
            let load = m
                .loads
                .get(&n)
                .map(|l| format!("load {} → {}", l.before, l.after))
                .unwrap_or_default();
            let _ = writeln!(o, "### N = {n} ({load})\n");
            let _ = writeln!(
                o,
                "| budget | tool | migrated | stopped | lost | empty after | power-off after | \
                 lower bound |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
            let mut cells: Vec<&Cell> = m.cells.iter().filter(|c| c.n == n).collect();
            cells.sort_by_key(|c| (!c.tool.budget_applies(), c.budget, c.tool));
            for c in cells {
                let budget = if c.tool.budget_applies() {
                    format!("{} s", c.budget)
                } else {
                    "any".into()
                };
                let lost = if c.lost > 0 {
                    format!("**{}**", c.lost)
                } else {
                    "0".into()
                };
                let _ = writeln!(
                    o,
                    "| {budget} | {} | {} | {} | {lost} | {} | {} | {} |",
                    c.tool.label(),
                    c.migrated,
                    c.stopped,
                    opt_secs(c.time_to_empty()),
                    opt_secs(c.time_to_power_off()),
                    secs(c.bound.total)
                );
            }
            let _ = writeln!(o);
        }
        for f in &m.retried {
            let _ = writeln!(
                o,
                "- run a second time, its setup having failed before the shutdown: N={} budget \
                 {} s, {}: {}",
                f.n,
                f.budget,
                f.tool.label(),
                f.error
            );
        }
        for f in &m.failures {
            let _ = writeln!(
                o,
                "- not measured: N={} budget {} s, {}: {}",
                f.n,
                f.budget,
                f.tool.label(),
                f.error
            );
        }
        let notes: Vec<String> = m
            .cells
            .iter()
            .filter(|c| c.other > 0)
            .flat_map(|c| {
                c.notes
                    .iter()
                    .map(move |n| format!("N={} {} s {}: {n}", c.n, c.budget, c.tool.label()))
            })
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(o, "\nVMIs the ledger could not class:\n");
            for n in notes.iter().take(20) {
                let _ = writeln!(o, "- {n}");
            }
        }
        let _ = writeln!(o);
        let api: Vec<&Cell> = m
            .cells
            .iter()
            .filter(|c| matches!(c.tool, Tool::Guard | Tool::Manual | Tool::Hook))
            .collect();
        if !api.is_empty() {
            let _ = writeln!(
                o,
                "API requests per drain (audit log, the tool's own user, from the request to the \
                 power-off):\n"
            );
            let _ = writeln!(o, "| N | budget | tool | requests | breakdown |");
            let _ = writeln!(o, "|---|---|---|---|---|");
            for c in api {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} |",
                    c.n,
                    if c.tool.budget_applies() {
                        format!("{} s", c.budget)
                    } else {
                        "any".into()
                    },
                    c.tool.label(),
                    audit::total(&c.requests),
                    audit::line(&c.requests)
                );
            }
            let _ = writeln!(o);
        }
    }

    fn bound_section(&self, o: &mut String) {
        let (Some(s), Some(_)) = (&self.settings, &self.matrix) else {
            return;
        };
        let guard = self.guard_cells();
        if guard.is_empty() {
            return;
        }
        let p = s.bound_params();
        let _ = writeln!(o, "## 2. Time to an empty node against its lower bound\n");
        let _ = writeln!(
            o,
            "Lower bound = max(longest migration, Σ migration times ÷ {} outbound slots, VM stop \
             time when a VMI must stop), where a migration takes {:.2} s plus memory ÷ {:.0} \
             GiB/s and a stop {:.0} s (stops need no slot and overlap the migrations). No \
             drain, whatever it does, empties node-1 sooner under KubeVirt's limits. The ratio \
             is shutdown-guard's time to empty over it; the target is ≤ 1.1 × bound + 1 s, \
             for cells whose deadline (budget − 5 s) covers the bound.\n",
            p.slots,
            p.fixed.as_secs_f64(),
            p.bandwidth as f64 / (1u64 << 30) as f64,
            p.stop.as_secs_f64()
        );
        let _ = writeln!(
            o,
            "*Where the time goes*, from the migrations' own phase times: *start* = request → \
             first migration admitted (the agent's evictions, KubeVirt's webhook and \
             evacuation controller); *mean migration* = admitted → ended, against the bound's \
             model; *slots busy* = the share of the {} outbound slots in use from the first \
             admission to the last end (what the 5 s re-queue and the creation of migrations \
             cost); *tail* = last migration's end → node empty.\n",
            p.slots
        );
        let _ = writeln!(
            o,
            "| N | budget | lower bound (longest / Σ÷k / stop) | time to empty | ratio | target | \
             start | mean migration (model) | slots busy | tail |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|");
        for c in guard {
            let b = &c.bound;
            let t = c.time_to_empty();
            let target = if !Self::budget_suffices(c) {
                "n/a: budget below the bound".to_owned()
            } else {
                match t {
                    Some(t) => met(within_target(t, b.total)).to_owned(),
                    None => "**missed**: not emptied".to_owned(),
                }
            };
            let d = breakdown(c, s).unwrap_or_default();
            let _ = writeln!(
                o,
                "| {} | {} s | {} ({:.1} / {:.1} / {:.0}) | {} | {} | {target} | {} | {} ({}) | {:.0} % | {} |",
                c.n,
                c.budget,
                secs(b.total),
                b.longest,
                b.sum_over_slots,
                b.stop,
                opt_secs(t),
                t.map_or("–".into(), |t| format!("{:.2}", t / b.total.max(1e-9))),
                secs(d.start),
                secs(d.mean_actual),
                secs(d.mean_model),
                100.0 * d.utilisation,
                secs(d.tail)
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "{PACING}");
    }

    fn latency_section(&self, o: &mut String) {
        let Some(l) = &self.latencies else { return };
        let runs = l.release.len();
        let _ = writeln!(o, "## 3. Latencies\n");
        let _ = writeln!(
            o,
            "{runs} shutdowns of node-1 (systemd; `systemctl reboot`, so the same node boots \
             again), each with {} LiveMigrate VMIs and a freshly started agent. *First \
             eviction*: the bench's own subscription to `PrepareForShutdown(true)` on node-1's \
             bus → the API server receiving the agent's first `create pods/eviction` (audit \
             `requestReceivedTimestamp`). *Release*: the API server receiving the write that \
             took the last VMI off node-1 → logind unlinking the lock's state file (stat every \
             0.5 ms). Nearest-rank percentiles (with 20 runs p99 is the maximum). Load {} → \
             {}.\n",
            self.settings.as_ref().map_or(0, |s| s.latency_vms),
            l.load.before,
            l.load.after
        );
        let _ = writeln!(o, "| latency | runs | p50 | p99 | min | max | target |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|");
        for (name, v) in [
            ("PrepareForShutdown → first eviction", &l.first_eviction),
            ("last VMI gone → lock released", &l.release),
        ] {
            let (lo, hi) = min_max(v);
            let p99 = percentile(v, 99.0);
            let _ = writeln!(
                o,
                "| {name} | {} | {} | {} | {} | {} | ≤ 20 ms p99: {} |",
                v.len(),
                ms(percentile(v, 50.0)),
                ms(p99),
                ms(lo),
                ms(hi),
                met(p99 <= 0.020)
            );
        }
        let _ = writeln!(
            o,
            "\nWhere the time goes, from the agent's own log timestamps (the machine's clock; \
             used for this split only):\n"
        );
        let _ = writeln!(o, "| part | p50 | p99 | max |");
        let _ = writeln!(o, "|---|---|---|---|");
        for (name, v) in PARTS.iter().zip(&l.parts) {
            let _ = writeln!(
                o,
                "| {name} | {} | {} | {} |",
                ms(percentile(v, 50.0)),
                ms(percentile(v, 99.0)),
                ms(min_max(v).1)
            );
        }
        let _ = writeln!(o, "\nPer run:\n\n```");
        for r in &l.runs {
            let _ = writeln!(o, "{r}");
        }
        let _ = writeln!(o, "```\n");
        for f in &l.failures {
            let _ = writeln!(o, "- failed: {f}");
        }
    }

    fn footprint_section(&self, o: &mut String) {
        let _ = writeln!(o, "## 4. Footprint\n");
        let _ = writeln!(o, "| figure | value | target |");
        let _ = writeln!(o, "|---|---|---|");
        if let Some(i) = &self.idle {
            let _ = writeln!(
                o,
                "| idle RSS, holder + worker (VmRSS summed; node-1, {} VMIs, lock held, watches open) | {} | ≤ 16 MiB: {} |",
                self.settings.as_ref().map_or(0, |s| s.latency_vms),
                mib(i.memory.rss),
                met(i.memory.rss <= 16 * 1024)
            );
            let _ = writeln!(
                o,
                "| idle PSS, holder + worker (the shared binary counted once) | {} | |",
                mib(i.memory.pss)
            );
            let _ = writeln!(
                o,
                "| idle CPU over {} s (utime + stime, both processes) | {:.2} s ({}) | |",
                i.window.as_secs(),
                i.cpu_secs,
                pct(i.cpu_secs / i.window.as_secs_f64().max(1e-9))
            );
        }
        if let Some(step) = self.fleet.as_ref().and_then(|f| f.steps.last()) {
            let cpu = &step.agent_cpu;
            let rss: Vec<f64> = step.agent_memory.iter().map(|m| m.rss as f64).collect();
            let _ = writeln!(
                o,
                "| idle CPU over {} s, each of {} agents (section 5) | median {}, max {} | < 0.1 %: {} |",
                step.window.as_secs(),
                step.agents,
                pct(median(cpu)),
                pct(min_max(cpu).1),
                met(min_max(cpu).1 < 0.001)
            );
            let _ = writeln!(
                o,
                "| idle RSS of those agents (holder + worker) | median {}, max {} | |",
                mib(median(&rss) as u64),
                mib(min_max(&rss).1 as u64)
            );
        }
        if let Some(c) = self.drain_footprint_cell() {
            let f = c.footprint.as_ref().expect("filtered");
            let _ = writeln!(
                o,
                "| CPU draining {} VMIs (budget {} s), holder + worker, from 1 s after the signal to the end ({:.0} s) | {} | < 1 %: {} |",
                c.n,
                c.budget,
                f.window,
                pct(f.cpu_share),
                met(f.cpu_share < 0.01)
            );
            let _ = writeln!(
                o,
                "| peak RSS during that drain (VmRSS summed, sampled every 100 ms; Σ VmHWM) | {} ({}) | |",
                mib(f.peak_rss),
                mib(f.hwm_sum)
            );
        }
        if let Some(b) = &self.build {
            let _ = writeln!(
                o,
                "| release binary (`{}`) | {:.1} MiB | |",
                rel(&b.binary),
                b.size as f64 / (1024.0 * 1024.0)
            );
            let dynamic = super::agent_build::is_dynamic(&b.binary);
            match self.image {
                Some((tar, gz)) => {
                    let _ = writeln!(
                        o,
                        "| image (Dockerfile: `FROM scratch` + the binary) | not built by the \
                         bench (`scripts/image.sh` builds it where buildah is installed); its one \
                         layer with this binary: {:.1} MiB, {:.1} MiB gzip-compressed as a \
                         registry stores it{} | |",
                        tar as f64 / (1024.0 * 1024.0),
                        gz as f64 / (1024.0 * 1024.0),
                        if dynamic {
                            " (this build links glibc dynamically; the image's static build differs \
                             by a few per cent)"
                        } else {
                            ""
                        }
                    );
                }
                None => {
                    let _ = writeln!(o, "| image | not measured: tar or gzip failed | |");
                }
            }
        }
        let _ = writeln!(o);
    }

    fn fleet_section(&self, o: &mut String) {
        let Some(f) = &self.fleet else { return };
        let _ = writeln!(o, "## 5. Fleet cost\n");
        let _ = writeln!(
            o,
            "One bed of {} nodes, each with its own elogind (the agent's code path is the one \
             it takes on systemd), one API server. First {} s without any agent, then agents on \
             the first {} nodes (one per node, each its own user so the audit log \
             attributes its requests), each size idle for its window and then through a \
             rolling reboot of {} nodes carrying 2 LiveMigrate VMIs each (power-off, the agent \
             drains, the node comes back with a new boot ID and a new agent). The API server's \
             CPU is its utime + stime over the window; its RSS is read at the window's end. The \
             bed's own clients (simulated kubelets renewing 1 lease and 1 node status per node \
             every 10 s, KubeVirt, the bench's watches) are in every row, the baseline \
             included. Load {} → {}.\n",
            f.nodes,
            f.baseline.window.as_secs(),
            f.steps
                .iter()
                .map(|st| st.agents.to_string())
                .filter(|a| a != "0")
                .collect::<Vec<_>>()
                .join(", "),
            self.settings.as_ref().map_or(0, |s| s.fleet_reboots),
            f.load.before,
            f.load.after
        );
        let _ = writeln!(
            o,
            "| agents | window | API server CPU | API server RSS | watches open (agents') | requests/s (all) | per agent: requests/hour median (max) | per agent: CPU median (max) | per agent: RSS median |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
        for step in std::iter::once(&f.baseline).chain(&f.steps) {
            row(o, step);
        }
        let _ = writeln!(o);
        if let Some(last) = f.steps.last() {
            let _ = writeln!(
                o,
                "What the idle agents asked for, all together, in the last window: {}.\n",
                audit::line(&last.breakdown)
            );
        }
        let rolling: Vec<&Step> = f.steps.iter().filter(|s| s.rolling.is_some()).collect();
        if !rolling.is_empty() {
            let _ = writeln!(
                o,
                "| agents | rolling reboot | took | API server CPU | requests per rebooted node's agent | requests of the other agents | shutdown → lock released, median (max) | VMIs on a node at its power-off |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
            for s in rolling {
                let r = s.rolling.as_ref().expect("filtered");
                let (_, hi) = min_max(&r.drains);
                let _ = writeln!(
                    o,
                    "| {} | {} nodes, {} VMIs | {} | {} | {:.1} | {} | {} ({}) | {} |",
                    s.agents,
                    r.nodes,
                    r.vmis,
                    secs(r.took),
                    pct(r.api.cpu),
                    r.per_rebooted_node,
                    r.others,
                    secs(median(&r.drains)),
                    secs(hi),
                    r.left_on_node
                );
            }
            let _ = writeln!(o);
        }
        for e in &f.failures {
            let _ = writeln!(o, "- failed: {e}");
        }
    }

    fn limits_section(&self, o: &mut String) {
        let _ = writeln!(o, "## 6. What this run does not show\n");
        let mut lines = vec![
            "The image itself: the size given is its single layer (the static binary); \
             `scripts/image.sh` builds and runs the image where buildah is installed \
             (`tests/image.rs`), outside the bench."
                .to_owned(),
            "kubelet's graceful node shutdown is a simulation of its manager (the file cited \
             above); it does not report the node NotReady or refuse new pods while shutting \
             down, which nothing in a cell reads."
                .to_owned(),
            "The simulated VM stop always ends gracefully within the pod's grace period (the \
             bed does not model a guest that ignores ACPI)."
                .to_owned(),
        ];
        if let Some(s) = &self.settings {
            if !s.sizes.contains(&200) {
                lines.push("N = 200 was not run.".into());
            }
            let skipped: Vec<String> = [60, 300, 900]
                .iter()
                .filter(|b| !s.budgets.contains(b))
                .map(|b| format!("{b} s"))
                .collect();
            if !skipped.is_empty() {
                lines.push(format!(
                    "Budgets not run: {} (a budget only caps a drain; cells that empty the node \
                     sooner do not depend on it).",
                    skipped.join(", ")
                ));
            }
            if s.fleet_window < Duration::from_secs(600) {
                lines.push(format!(
                    "Fleet windows of {} s instead of 10 minutes (requests per hour are scaled \
                     from them).",
                    s.fleet_window.as_secs()
                ));
            }
            if s.fleet_sizes.last().is_some_and(|&n| n < 200) {
                lines.push(format!(
                    "A fleet of 200 agents was not run (largest: {}).",
                    s.fleet_sizes.last().copied().unwrap_or(0)
                ));
            }
        }
        for l in lines {
            let _ = writeln!(o, "- {l}");
        }
        let _ = writeln!(o);
    }
}

fn row(o: &mut String, s: &Step) {
    let rss: Vec<f64> = s.agent_memory.iter().map(|m| m.rss as f64).collect();
    let (per_agent, cpu, mem) = if s.agents == 0 {
        ("–".to_owned(), "–".to_owned(), "–".to_owned())
    } else {
        (
            format!(
                "{:.1} ({:.1})",
                median(&s.per_agent_hourly),
                min_max(&s.per_agent_hourly).1
            ),
            format!(
                "{} ({})",
                pct(median(&s.agent_cpu)),
                pct(min_max(&s.agent_cpu).1)
            ),
            mib(median(&rss) as u64),
        )
    };
    let _ = writeln!(
        o,
        "| {} | {} s | {} | {} | {} ({}) | {:.1} | {per_agent} | {cpu} | {mem} |",
        s.agents,
        s.window.as_secs(),
        pct(s.api.cpu),
        mib(s.api.rss),
        s.api.watches,
        s.agent_watches,
        s.api.rate
    );
}
