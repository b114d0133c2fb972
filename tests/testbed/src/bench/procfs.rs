//! What `/proc` says about processes and the machine: CPU time, memory, the load. Every
//! footprint figure of the report comes from here, never from the agent itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Memory of one process, KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`.
    pub rss: u64,
    /// `VmHWM`: the peak RSS since the process started.
    pub hwm: u64,
    /// `Pss` from `smaps_rollup`: shared pages (the same binary mapped twice) counted once
    /// across the processes that share them. 0 where unreadable.
    pub pss: u64,
}

impl std::ops::Add for Memory {
    type Output = Memory;
    fn add(self, o: Memory) -> Memory {
        Memory {
            rss: self.rss + o.rss,
            hwm: self.hwm + o.hwm,
            pss: self.pss + o.pss,
        }
    }
}

fn status_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
}

pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| status_field(&t, "Pss:"))
        .unwrap_or(0);
    Some(Memory {
        rss: status_field(&status, "VmRSS:")?,
        hwm: status_field(&status, "VmHWM:")?,
        pss,
    })
}

/// utime + stime, clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its `)` are fixed.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|v| v as f64)
        .unwrap_or(100.0)
}

pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Direct children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .flatten()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every process under `root` (itself included) named `comm`, breadth first: the agent's
/// holder and the worker it starts sit under the pod's wrappers.
pub fn descendants_named(root: u32, name: &str) -> Vec<u32> {
    let mut queue = std::collections::VecDeque::from([root]);
    let mut out = Vec::new();
    let mut seen = 0;
    while let Some(pid) = queue.pop_front() {
        seen += 1;
        if seen > 512 {
            break;
        }
        if comm(pid) == name {
            out.push(pid);
        }
        queue.extend(children(pid));
    }
    out
}

/// The 1-, 5- and 15-minute load averages as `/proc/loadavg` prints them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Cores, CPU model, kernel and memory of the machine.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| status_field(&t, "MemTotal:"))
        .map(|k| format!(", {:.0} GiB RAM", k as f64 / (1024.0 * 1024.0)))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}){mem}, Linux {}", kernel.trim())
}

/// The load before and after a section of the run.
#[derive(Clone, Debug, Default)]
pub struct Load {
    pub before: String,
    pub after: String,
}

impl Load {
    pub fn start() -> Self {
        Self {
            before: load_average(),
            after: String::new(),
        }
    }
    pub fn end(&mut self) {
        self.after = load_average();
    }
}

/// The last sample of a set of processes.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub at: Option<SystemTime>,
    /// Sum over the processes still readable.
    pub cpu_ticks: u64,
    pub memory: Memory,
    /// How many of the processes were readable.
    pub alive: usize,
}

/// Reads CPU and memory of `pids` every `every` in a thread of its own until stopped, keeping
/// the first and the last complete sample: a process that dies with its node (the agent at
/// power-off) is still measured up to its end.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    peak_rss: Arc<std::sync::atomic::AtomicU64>,
    first: Arc<Mutex<Option<Sample>>>,
    last: Arc<Mutex<Option<Sample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn sample(pids: &[u32]) -> Sample {
    let mut s = Sample {
        at: Some(SystemTime::now()),
        ..Sample::default()
    };
    for &pid in pids {
        if let (Some(t), Some(m)) = (cpu_ticks(pid), memory(pid)) {
            s.cpu_ticks += t;
            s.memory = s.memory + m;
            s.alive += 1;
        }
    }
    s
}

impl Sampler {
    pub fn start(pids: Vec<u32>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_rss = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let first = Arc::new(Mutex::new(None));
        let last = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, first, last, peak) =
                (stop.clone(), first.clone(), last.clone(), peak_rss.clone());
            std::thread::spawn(move || {
                let want = pids.len();
                while !stop.load(Ordering::SeqCst) {
                    let s = sample(&pids);
                    if s.alive < want {
                        break;
                    }
                    peak.fetch_max(s.memory.rss, Ordering::SeqCst);
                    first
                        .lock()
                        .expect("sampler lock")
                        .get_or_insert_with(|| s.clone());
                    *last.lock().expect("sampler lock") = Some(s);
                    std::thread::sleep(every);
                }
            })
        };
        Self {
            stop,
            peak_rss,
            first,
            last,
            thread: Some(thread),
        }
    }

    /// The highest sum of VmRSS seen so far, KiB.
    pub fn peak_rss(&self) -> u64 {
        self.peak_rss.load(Ordering::SeqCst)
    }

    /// Stops sampling; `(first, last)` complete samples.
    pub fn finish(mut self) -> (Option<Sample>, Option<Sample>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let first = self.first.lock().expect("sampler lock").clone();
        let last = self.last.lock().expect("sampler lock").clone();
        (first, last)
    }

    /// The newest complete sample so far.
    pub fn last(&self) -> Option<Sample> {
        self.last.lock().expect("sampler lock").clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
