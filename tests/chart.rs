//! The Helm chart (`charts/shutdown-guard`), with a real helm built from its Go module:
//!
//! - `helm lint` is clean, and the default render is the objects `kubectl kustomize manifests/`
//!   makes, plus Helm's four labels: the chart reads `manifests/` at render time, so they are
//!   one source of truth;
//! - each value changes exactly what it names; bad values are refused naming the key;
//! - a changed `manifests/` shows up in the render with no edit to the chart, and a kustomize
//!   field the chart does not apply stops the render, naming it;
//! - `helm install` on the bed's API server with the defaults and into the release's own
//!   namespace, and `helm upgrade` of a setting rolls the ConfigMap;
//! - on the full bed, the agent identity of an install into another namespace with another
//!   ServiceAccount name drains node-1 and is refused elsewhere.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::identity;
use common::init_tracing;
use common::tools::{diff_paths, helm, kustomize, object_id, repo, run, yaml_docs};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::Api;
use serde_json::Value;
use testbed::bed::Bed;
use testbed::controlplane::{ControlPlane, ControlPlaneOptions};

/// The labels the chart adds to every object, over what kustomize makes.
const HELM_LABELS: [&str; 4] = [
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
];

fn chart_dir() -> PathBuf {
    repo().join("charts/shutdown-guard")
}

/// `helm template RELEASE CHART ARGS`: the objects, or helm's error.
fn template(home: &Path, chart: &Path, release: &str, args: &[&str]) -> Result<Vec<Value>, String> {
    let r = run(helm(home).args(["template", release]).arg(chart).args(args));
    if r.ok {
        Ok(yaml_docs(&r.stdout))
    } else {
        Err(r.stderr)
    }
}

/// Removes Helm's labels from every object, checking they are there with the release's values.
fn strip_helm_labels(objs: &mut [Value], release: &str) {
    for o in objs.iter_mut() {
        let id = object_id(o);
        let labels = o["metadata"]["labels"]
            .as_object_mut()
            .unwrap_or_else(|| panic!("{id} has no labels"));
        for l in HELM_LABELS {
            let v = labels.remove(l);
            assert!(v.is_some(), "{id} lacks Helm's label {l}");
            if l == "app.kubernetes.io/instance" {
                assert_eq!(v.unwrap(), release, "{id}: {l}");
            }
        }
        assert!(!labels.is_empty(), "{id}: no label of kustomize's");
    }
}

/// The two renders hold the same objects; a difference names the object and the paths.
fn assert_same_objects(want: &[Value], got: &[Value], what: &str) {
    let index = |objs: &[Value]| -> BTreeMap<String, Value> {
        objs.iter().map(|o| (object_id(o), o.clone())).collect()
    };
    let (w, g) = (index(want), index(got));
    let only_want: Vec<&String> = w.keys().filter(|k| !g.contains_key(*k)).collect();
    let only_got: Vec<&String> = g.keys().filter(|k| !w.contains_key(*k)).collect();
    let mut diffs = Vec::new();
    for (id, o) in &w {
        if let Some(p) = g.get(id) {
            for path in diff_paths(o, p) {
                diffs.push(format!("{id}: {path}"));
            }
        }
    }
    assert!(
        only_want.is_empty() && only_got.is_empty() && diffs.is_empty(),
        "{what}: the chart's render differs from kustomize's objects.\n\
         only in kustomize's: {only_want:?}\nonly in the chart's: {only_got:?}\ndiffering: {diffs:#?}\n\
         The chart reads manifests/ through charts/shutdown-guard/templates/manifests.yaml: teach \
         it what manifests/ now uses."
    );
}

/// Objects keyed `Kind#n` (the n-th of its kind in render order), so a renamed object is still
/// compared with its counterpart.
fn by_kind(objs: &[Value]) -> BTreeMap<String, Value> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    objs.iter()
        .map(|o| {
            let kind = o["kind"].as_str().unwrap_or("?").to_string();
            let n = seen.entry(kind.clone()).or_default();
            let key = format!("{kind}#{n}");
            *n += 1;
            (key, o.clone())
        })
        .collect()
}

/// Every difference between two renders, as `Kind#n:/path` (`Kind#n:/` for an object only one
/// render has).
fn changes(base: &[Value], other: &[Value]) -> Vec<String> {
    let (a, b) = (by_kind(base), by_kind(other));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) => {
                out.extend(diff_paths(x, y).into_iter().map(|p| format!("{k}:{p}")))
            }
            _ => out.push(format!("{k}:/")),
        }
    }
    out
}

/// `*` stands for one path segment (or a whole `Kind#n`), `**` for the rest of the path.
fn matches(pattern: &str, path: &str) -> bool {
    let (p, s): (Vec<&str>, Vec<&str>) = (
        pattern.split([':', '/']).collect(),
        path.split([':', '/']).collect(),
    );
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            "**" => return true,
            "*" if i < s.len() => {}
            seg if i < s.len() && seg == s[i] => {}
            _ => return false,
        }
        i += 1;
    }
    i == s.len()
}

fn data_of(objs: &[Value], kind: &str) -> Value {
    objs.iter()
        .find(|o| o["kind"] == kind)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn lint_is_clean_and_the_default_render_is_the_kustomize_objects() {
    let home = tempfile::tempdir().unwrap();
    let lint = run(helm(home.path())
        .args(["lint", "--strict"])
        .arg(chart_dir()));
    eprintln!("helm lint --strict:\n{}{}", lint.stdout, lint.stderr);
    assert!(
        lint.ok,
        "helm lint --strict failed:\n{}{}",
        lint.stdout, lint.stderr
    );
    for bad in ["[WARNING]", "[ERROR]"] {
        assert!(!lint.stdout.contains(bad), "helm lint: {}", lint.stdout);
    }

    let mut chart =
        template(home.path(), &chart_dir(), "shutdown-guard", &[]).expect("helm template");
    strip_helm_labels(&mut chart, "shutdown-guard");
    let kust = kustomize(&repo().join("manifests"));
    assert!(kust.len() >= 8, "kustomize made {} objects", kust.len());
    assert_same_objects(&kust, &chart, "default values");

    // One version everywhere: the chart's, its appVersion, the crate's and the image tag.
    let chart_yaml: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    let k: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("manifests/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(chart_yaml["version"], v, "Chart.yaml version");
    assert_eq!(chart_yaml["appVersion"], v, "Chart.yaml appVersion");
    assert_eq!(
        k["images"][0]["newTag"], v,
        "manifests/kustomization.yaml image tag"
    );
}

#[test]
fn each_value_changes_only_what_it_names_and_bad_values_are_refused() {
    let home = tempfile::tempdir().unwrap();
    let t = |args: &[&str]| template(home.path(), &chart_dir(), "sg", args);
    let base = t(&[]).expect("default render");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--set", "namespace.name=guard-system"],
            &[
                "Namespace#0:/metadata/name",
                "*:/metadata/namespace",
                "ClusterRoleBinding#0:/subjects/0/namespace",
                "RoleBinding#0:/subjects/0/namespace",
                "ValidatingAdmissionPolicy#0:/spec/matchConditions/0/expression",
                "ValidatingAdmissionPolicy#1:/spec/matchConditions/0/expression",
            ],
        ),
        (
            &["--set", "serviceAccount.name=node-guard"],
            &[
                "ServiceAccount#0:/metadata/name",
                "DaemonSet#0:/spec/template/spec/serviceAccountName",
                "ClusterRoleBinding#0:/subjects/0/name",
                "RoleBinding#0:/subjects/0/name",
                "ValidatingAdmissionPolicy#0:/spec/matchConditions/0/expression",
                "ValidatingAdmissionPolicy#1:/spec/matchConditions/0/expression",
            ],
        ),
        (&["--set", "namespace.create=false"], &["Namespace#0:/"]),
        (
            &[
                "--set",
                "config.scope=all,config.drain_budget=10m,config.safety_margin=15",
            ],
            &[
                "ConfigMap#0:/metadata/name",
                "ConfigMap#0:/data/config.yaml",
                "DaemonSet#0:/spec/template/spec/volumes/*/configMap/name",
                // Scope all evicts more than launcher pods: no eviction policy.
                "ValidatingAdmissionPolicy#1:/",
                "ValidatingAdmissionPolicyBinding#1:/",
            ],
        ),
        (
            &[
                "--set",
                "image.repository=registry.example/sg,image.tag=1.2.3,image.pullPolicy=Always",
            ],
            &[
                // One image for both processes: the holder runs the same binary.
                "DaemonSet#0:/spec/template/spec/containers/0/image",
                "DaemonSet#0:/spec/template/spec/containers/0/imagePullPolicy",
                "DaemonSet#0:/spec/template/spec/initContainers/0/image",
                "DaemonSet#0:/spec/template/spec/initContainers/0/imagePullPolicy",
            ],
        ),
        (
            &[
                "--set",
                "resources.requests.cpu=50m,resources.limits.memory=256Mi",
            ],
            &["DaemonSet#0:/spec/template/spec/containers/0/resources/**"],
        ),
        (
            &[
                "--set",
                "holderResources.requests.cpu=20m,holderResources.limits.memory=64Mi",
            ],
            &["DaemonSet#0:/spec/template/spec/initContainers/0/resources/**"],
        ),
        (
            &["--set", "holderRunAsUser=64010"],
            &[
                "DaemonSet#0:/spec/template/spec/initContainers/0/securityContext/runAsUser",
                "DaemonSet#0:/spec/template/spec/initContainers/0/securityContext/runAsGroup",
                "DaemonSet#0:/spec/template/spec/initContainers/0/securityContext/runAsNonRoot",
            ],
        ),
        (
            &[
                "--set",
                "tolerations[0].key=maintenance,tolerations[0].operator=Exists",
                "--set-string",
                "nodeSelector.kubevirt\\.io/schedulable=true",
                "--set",
                "priorityClassName=guard-critical",
            ],
            &[
                "DaemonSet#0:/spec/template/spec/tolerations/**",
                "DaemonSet#0:/spec/template/spec/nodeSelector",
                "DaemonSet#0:/spec/template/spec/priorityClassName",
            ],
        ),
        (
            &["--set", "podAnnotations.example\\.com/team=virt"],
            &["DaemonSet#0:/spec/template/metadata/annotations"],
        ),
    ];
    for (args, want) in cases {
        let other = t(args).unwrap_or_else(|e| panic!("helm template {args:?}: {e}"));
        let changed = changes(&base, &other);
        let stray: Vec<&String> = changed
            .iter()
            .filter(|c| !want.iter().any(|w| matches(w, c)))
            .collect();
        let missing: Vec<&&str> = want
            .iter()
            .filter(|w| !changed.iter().any(|c| matches(w, c)))
            .collect();
        assert!(
            stray.is_empty() && missing.is_empty(),
            "{args:?}: changed beyond what it names: {stray:#?}; did not change: {missing:#?}"
        );
    }

    // Where the values went: the moved identity in the policy, the settings the agent loads.
    let moved = t(&[
        "--set",
        "namespace.name=guard-system,serviceAccount.name=node-guard",
    ])
    .unwrap();
    let vap = data_of(&moved, "ValidatingAdmissionPolicy");
    assert_eq!(
        vap["spec"]["matchConditions"][0]["expression"],
        "request.userInfo.username == 'system:serviceaccount:guard-system:node-guard' || \
         request.userInfo.username.startsWith('shutdown-guard-host:')"
    );
    let set = t(&[
        "--set",
        "config.scope=all,config.drain_budget=10m,config.safety_margin=15",
    ])
    .unwrap();
    let text = data_of(&set, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, &text).unwrap();
    let s = shutdown_guard::config::load(&shutdown_guard::config::Sources {
        file: Some(&file),
        env: [("NODE_NAME".to_string(), "node-1".to_string())].into(),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("the agent does not load the rendered config: {e}\n{text}"));
    assert_eq!(s.scope, shutdown_guard::config::Scope::All);
    assert_eq!(s.drain_budget.as_secs(), 600);
    assert_eq!(s.safety_margin.as_secs(), 15);
    assert_eq!(
        s.log_format,
        shutdown_guard::config::LogFormat::Json,
        "untouched settings stay"
    );

    // Refused, naming what is wrong.
    for (args, says) in [
        (&["--set", "config.scope=some"][..], "/config/scope"),
        (&["--set", "config.bogus=1"][..], "bogus"),
        (
            &["--set", "config.drain_budget=soon"][..],
            "/config/drain_budget",
        ),
        (
            &["--set", "namespace.name=Not_A_Name"][..],
            "/namespace/name",
        ),
        (
            &["--set", "image.pullPolicy=Sometimes"][..],
            "/image/pullPolicy",
        ),
        // The chart may not create the namespace Helm keeps the release in.
        (
            &["--namespace", "shutdown-guard"][..],
            "namespace.create=false",
        ),
    ] {
        let err = t(args).expect_err(&format!("{args:?} is refused"));
        assert!(
            err.contains(says),
            "{args:?}: the error does not say {says:?}:\n{err}"
        );
    }
}

/// Copies the parts of the repository the chart reads into `dir`, keeping its links.
fn copy_chart_tree(dir: &Path) {
    for sub in ["manifests", "monitoring", "charts"] {
        let r = run(std::process::Command::new("cp")
            .arg("-a")
            .arg(repo().join(sub))
            .arg(dir));
        assert!(r.ok, "cp {sub}: {}", r.stderr);
    }
}

fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn a_changed_manifests_folder_shows_in_the_chart_with_no_edit_and_unknown_kustomize_fields_stop_it()
{
    let home = tempfile::tempdir().unwrap();
    let tree = tempfile::tempdir().unwrap();
    copy_chart_tree(tree.path());
    let manifests = tree.path().join("manifests");
    let chart = tree.path().join("charts/shutdown-guard");
    // What the process-model change might do: another variable, no liveness probe, a setting.
    edit(
        &manifests.join("daemonset.yaml"),
        // The worker's env (the holder's init container comes first in the file).
        "--link-socket\", \"/run/shutdown-guard/link.sock\"]\n          env:\n            - name: NODE_NAME\n              valueFrom:\n                fieldRef:\n                  fieldPath: spec.nodeName\n          ports:",
        "--link-socket\", \"/run/shutdown-guard/link.sock\"]\n          env:\n            - name: SHUTDOWN_GUARD_EXAMPLE\n              value: \"1\"\n            - name: NODE_NAME\n              valueFrom:\n                fieldRef:\n                  fieldPath: spec.nodeName\n          ports:",
    );
    let ds = std::fs::read_to_string(manifests.join("daemonset.yaml")).unwrap();
    let start = ds
        .find("          livenessProbe:")
        .expect("a liveness probe");
    let end = ds
        .find("          readinessProbe:")
        .expect("a readiness probe");
    std::fs::write(
        manifests.join("daemonset.yaml"),
        format!("{}{}", &ds[..start], &ds[end..]),
    )
    .unwrap();
    edit(
        &manifests.join("config.yaml"),
        "drain_budget: 5m",
        "drain_budget: 7m",
    );

    let mut got = template(home.path(), &chart, "shutdown-guard", &[]).expect("helm template");
    strip_helm_labels(&mut got, "shutdown-guard");
    let want = kustomize(&manifests);
    assert_same_objects(&want, &got, "edited manifests");
    let ds = data_of(&got, "DaemonSet");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert!(c.get("livenessProbe").is_none());
    assert_eq!(c["env"][0]["name"], "SHUTDOWN_GUARD_EXAMPLE");
    assert!(
        data_of(&got, "ConfigMap")["data"]["config.yaml"]
            .as_str()
            .unwrap()
            .contains("drain_budget: 7m")
    );

    // A kustomize field the chart does not apply is an error naming it, not a silent difference.
    edit(
        &manifests.join("kustomization.yaml"),
        "resources:\n",
        "namePrefix: site-\nresources:\n",
    );
    let err = template(home.path(), &chart, "shutdown-guard", &[])
        .expect_err("namePrefix stops the render");
    assert!(
        err.contains("\"namePrefix\"") && err.contains("templates/manifests.yaml"),
        "{err}"
    );
}

#[test]
fn monitoring_objects_carry_the_rules_and_the_dashboard() {
    let home = tempfile::tempdir().unwrap();
    let objs = template(
        home.path(),
        &chart_dir(),
        "sg",
        &[
            "--set",
            "monitoring.podMonitor.enabled=true,monitoring.prometheusRule.enabled=true,monitoring.dashboard.enabled=true",
            "--set",
            "namespace.name=guard-system",
        ],
    )
    .expect("helm template");
    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("monitoring/shutdown-guard.rules.yaml")).unwrap(),
    )
    .unwrap();
    let pr = data_of(&objs, "PrometheusRule");
    assert_eq!(pr["spec"], rules, "the PrometheusRule is the rule file");
    assert_eq!(pr["metadata"]["namespace"], "guard-system");
    let dash = objs
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "shutdown-guard-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(
        dash["data"]["shutdown-guard.json"].as_str(),
        Some(
            std::fs::read_to_string(repo().join("monitoring/shutdown-guard.dashboard.json"))
                .unwrap()
                .as_str()
        )
    );
    assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "1");
    let pm = data_of(&objs, "PodMonitor");
    let ds = data_of(&objs, "DaemonSet");
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(pm["metadata"]["namespace"], "guard-system");
    let port = &ds["spec"]["template"]["spec"]["containers"][0]["ports"][0];
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], port["name"]);
    // Off by default: the default render has none of them.
    let base = template(home.path(), &chart_dir(), "sg", &[]).unwrap();
    assert!(
        !base
            .iter()
            .any(|o| o["kind"] == "PodMonitor" || o["kind"] == "PrometheusRule")
    );
}

/// `helm install|upgrade|uninstall …` against `kubeconfig`.
fn helm_on(home: &Path, kubeconfig: &Path, args: &[&str]) -> String {
    let r = run(helm(home).arg("--kubeconfig").arg(kubeconfig).args(args));
    assert!(r.ok, "helm {args:?} failed:\n{}{}", r.stdout, r.stderr);
    r.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_with_defaults_and_into_the_release_namespace_and_upgrades_roll_the_config() {
    init_tracing();
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    let client = cp.client().await.expect("admin client");
    let home = tempfile::tempdir().unwrap();
    let kc = cp.kubeconfig_path().to_path_buf();
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();

    // Defaults: the release in "default", the agent in its own namespace, made by the chart.
    helm_on(
        home.path(),
        &kc,
        &["install", "shutdown-guard", chart, "--namespace", "default"],
    );
    let rendered = template(
        home.path(),
        &chart_dir(),
        "shutdown-guard",
        &["--namespace", "default"],
    )
    .unwrap();
    for o in &rendered {
        let id = object_id(o);
        let mut args = vec![
            "get".to_string(),
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap().to_lowercase(),
                o["metadata"]["name"].as_str().unwrap()
            ),
        ];
        if let Some(ns) = o["metadata"]["namespace"].as_str() {
            args.extend(["-n".into(), ns.into()]);
        }
        let r = run(cp.kubectl().args(&args));
        assert!(r.ok, "{id} was not installed: {}", r.stderr);
    }
    let ns = Api::<Namespace>::all(client.clone())
        .get("shutdown-guard")
        .await
        .unwrap();
    assert_eq!(
        ns.metadata
            .labels
            .unwrap_or_default()
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged")
    );

    // A setting changed by an upgrade makes a new ConfigMap, and the DaemonSet moves to it.
    let config_volume = |ds: &DaemonSet| -> String {
        ds.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .iter()
            .flatten()
            .find_map(|v| v.config_map.as_ref().map(|c| c.name.clone()))
            .expect("a ConfigMap volume")
    };
    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), "shutdown-guard");
    let before = config_volume(&dss.get("shutdown-guard").await.unwrap());
    helm_on(
        home.path(),
        &kc,
        &[
            "upgrade",
            "shutdown-guard",
            chart,
            "--namespace",
            "default",
            "--set",
            "config.drain_budget=10m",
        ],
    );
    let after = config_volume(&dss.get("shutdown-guard").await.unwrap());
    assert_ne!(
        before, after,
        "the DaemonSet still mounts the old ConfigMap"
    );
    let cm = Api::<ConfigMap>::namespaced(client.clone(), "shutdown-guard")
        .get(&after)
        .await
        .unwrap();
    assert!(cm.data.unwrap()["config.yaml"].contains("drain_budget: 10m"));
    helm_on(
        home.path(),
        &kc,
        &[
            "uninstall",
            "shutdown-guard",
            "--namespace",
            "default",
            "--wait",
        ],
    );
    assert!(
        Api::<ClusterRoleBinding>::all(client.clone())
            .get_opt("shutdown-guard")
            .await
            .unwrap()
            .is_none(),
        "uninstall left the ClusterRoleBinding"
    );

    // Into the release's own namespace, which Helm makes; the chart only uses it.
    helm_on(
        home.path(),
        &kc,
        &[
            "install",
            "guard",
            chart,
            "--namespace",
            "ops",
            "--create-namespace",
            "--set",
            "namespace.name=ops,namespace.create=false",
        ],
    );
    Api::<DaemonSet>::namespaced(client.clone(), "ops")
        .get("shutdown-guard")
        .await
        .expect("the DaemonSet in ops");
    let crb = Api::<ClusterRoleBinding>::all(client.clone())
        .get("shutdown-guard")
        .await
        .unwrap();
    let subject = &crb.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("shutdown-guard", Some("ops"))
    );
    cp.shutdown().await.expect("control plane stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_of_a_helm_install_elsewhere_drains_node_1_and_is_refused_elsewhere() {
    init_tracing();
    let bed = Bed::start(identity::bed_options())
        .await
        .expect("the bed starts");
    let home = tempfile::tempdir().unwrap();
    let chart = chart_dir();
    helm_on(
        home.path(),
        bed.kubeconfig_path(),
        &[
            "install",
            "guard",
            chart.to_str().unwrap(),
            "--namespace",
            "default",
            "--set",
            "namespace.name=guard-system,serviceAccount.name=node-guard",
        ],
    );
    identity::drains_its_node_and_is_refused_elsewhere(&bed, "guard-system", "node-guard").await;
    bed.shutdown().await.expect("the bed stops");
}
