//! The operators' tools the shipping tests run (helm and promtool, built from their Go modules by
//! `tests/testbed/scripts/build-ops-tools.sh`; kubectl from the bed), and what their output is
//! compared with: YAML documents as JSON values, and the paths where two values differ.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::Value;

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `helm` or `promtool` from the bed's cache; a missing one says how to get it.
pub fn ops_tool(name: &str) -> PathBuf {
    let p = testbed::paths::cache_dir().join("bin").join(name);
    assert!(
        p.is_file(),
        "{name} not found at {}: tests/testbed/scripts/setup.sh builds it (build-ops-tools.sh)",
        p.display()
    );
    p
}

pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to its end (no stdin).
pub fn run(cmd: &mut Command) -> Ran {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// helm with its own configuration, cache and data folders under `home`, so a test neither
/// reads nor writes the user's.
pub fn helm(home: &Path) -> Command {
    let mut c = Command::new(ops_tool("helm"));
    for (var, sub) in [
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_DATA_HOME", "data"),
    ] {
        c.env(var, home.join(sub));
    }
    c.env_remove("KUBECONFIG");
    c
}

/// Every non-empty document of a multi-document YAML text.
pub fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("not YAML: {e}\n{text}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubectl kustomize DIR` with the bed's kubectl (kustomize built in).
pub fn kustomize(dir: &Path) -> Vec<Value> {
    let r = run(Command::new(testbed::bed::Bed::kubectl_path())
        .arg("kustomize")
        .arg(dir));
    assert!(
        r.ok,
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        r.stderr
    );
    yaml_docs(&r.stdout)
}

/// The paths (`/a/b/0`) at which `a` and `b` differ, each as deep as the difference goes.
pub fn diff_paths(a: &Value, b: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_into(a, b, String::new(), &mut out);
    out
}

fn diff_into(a: &Value, b: &Value, at: String, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = format!("{at}/{k}");
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => diff_into(p, q, path, out),
                    _ => out.push(path),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff_into(p, q, format!("{at}/{i}"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(if at.is_empty() { "/".into() } else { at }),
    }
}

/// `kind/name` (with the namespace when there is one) of an object.
pub fn object_id(o: &Value) -> String {
    let md = &o["metadata"];
    match md["namespace"].as_str() {
        Some(ns) => format!(
            "{}/{ns}/{}",
            o["kind"].as_str().unwrap_or("?"),
            md["name"].as_str().unwrap_or("?")
        ),
        None => format!(
            "{}/{}",
            o["kind"].as_str().unwrap_or("?"),
            md["name"].as_str().unwrap_or("?")
        ),
    }
}
