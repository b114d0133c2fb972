//! Requests as the API server's audit log has them, attributed by user: each tool, and each
//! agent of a fleet, authenticates with a client certificate of its own.

use std::collections::BTreeMap;
use std::time::SystemTime;

use chrono::{DateTime, Utc};

use crate::controlplane::ControlPlane;

/// `verb resource[/subresource]` → count.
pub type RequestCounts = BTreeMap<String, u32>;

/// An audit event reduced to what the bench counts.
#[derive(Clone, Debug)]
pub struct Request {
    pub user: String,
    pub verb: String,
    /// `resource[/subresource]`, or the path of a non-resource request (discovery).
    pub resource: String,
    pub name: String,
    pub namespace: String,
    pub uri: String,
    pub received: SystemTime,
    /// Watches: when the watch ended (`ResponseComplete`), if it has.
    pub ended: Option<SystemTime>,
}

impl Request {
    pub fn key(&self) -> String {
        format!("{} {}", self.verb, self.resource)
    }
}

fn parse_time(s: &str) -> Option<SystemTime> {
    s.parse::<DateTime<Utc>>().ok().map(Into::into)
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct Line {
    #[serde(rename = "auditID")]
    audit_id: String,
    stage: String,
    verb: String,
    #[serde(rename = "requestURI")]
    request_uri: String,
    user: crate::controlplane::AuditUser,
    object_ref: Option<crate::controlplane::AuditObjectRef>,
    request_received_timestamp: String,
    stage_timestamp: String,
}

impl Line {
    fn resource(&self) -> String {
        match &self.object_ref {
            Some(r) if !r.resource.is_empty() => match &r.subresource {
                Some(sub) => format!("{}/{sub}", r.resource),
                None => r.resource.clone(),
            },
            _ => self
                .request_uri
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    }
}

/// Every request, once: non-watch requests at `ResponseComplete`, watches at
/// `ResponseStarted` (an open watch has no completion yet) with their end when there is one.
pub fn requests(cp: &ControlPlane) -> Vec<Request> {
    let text = std::fs::read_to_string(cp.audit_log_path()).unwrap_or_default();
    let mut out: Vec<Request> = Vec::new();
    let mut watches: BTreeMap<String, usize> = BTreeMap::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<Line>(line) else {
            continue;
        };
        let watch = e.verb == "watch";
        match (watch, e.stage.as_str()) {
            (true, "ResponseStarted") | (false, "ResponseComplete") => {}
            (true, "ResponseComplete") => {
                if let Some(&i) = watches.get(&e.audit_id) {
                    out[i].ended = parse_time(&e.stage_timestamp);
                }
                continue;
            }
            _ => continue,
        }
        let Some(received) = parse_time(&e.request_received_timestamp) else {
            continue;
        };
        let resource = e.resource();
        let r = e.object_ref.unwrap_or_default();
        if watch {
            watches.insert(e.audit_id.clone(), out.len());
        }
        out.push(Request {
            resource,
            user: e.user.username,
            verb: e.verb,
            name: r.name.unwrap_or_default(),
            namespace: r.namespace.unwrap_or_default(),
            uri: e.request_uri,
            received,
            ended: None,
        });
    }
    out
}

/// Requests of users `user(u)` received in `[from, to]`.
pub fn count(
    reqs: &[Request],
    user: impl Fn(&str) -> bool,
    from: SystemTime,
    to: SystemTime,
) -> RequestCounts {
    let mut out = RequestCounts::new();
    for r in reqs
        .iter()
        .filter(|r| user(&r.user) && r.received >= from && r.received <= to)
    {
        *out.entry(r.key()).or_default() += 1;
    }
    out
}

/// Watches of users `user(u)` open at `at`.
pub fn open_watches(reqs: &[Request], user: impl Fn(&str) -> bool, at: SystemTime) -> usize {
    reqs.iter()
        .filter(|r| {
            r.verb == "watch" && user(&r.user) && r.received <= at && r.ended.is_none_or(|e| e > at)
        })
        .count()
}

/// When the API server received the first eviction request of `user` at or after `from`.
pub fn first_eviction(reqs: &[Request], user: &str, from: SystemTime) -> Option<SystemTime> {
    reqs.iter()
        .filter(|r| {
            r.user == user
                && r.verb == "create"
                && r.resource == "pods/eviction"
                && r.received >= from
        })
        .map(|r| r.received)
        .min()
}

pub fn total(c: &RequestCounts) -> u32 {
    c.values().sum()
}

pub fn line(c: &RequestCounts) -> String {
    if c.is_empty() {
        return "none".into();
    }
    c.iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
