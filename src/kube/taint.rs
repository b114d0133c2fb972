//! The agent's own taint on its Node while a reboot is pending: `PreferNoSchedule`, so the
//! scheduler (and with it KubeVirt's migration targets) prefers nodes that are not about to go
//! down, without refusing this one when nothing else fits. Every change is guarded by the
//! Node's resourceVersion ([`cordon::update`]), so nobody else's taint is ever lost.

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::Api;
use serde_json::json;

use super::cordon::{self, Change};

/// Ours alone: the own-node policy lets the agent add and remove taints under this prefix, and
/// only with effect `PreferNoSchedule`.
pub const REBOOT_PENDING_TAINT: &str = "shutdown-guard.kubevirt.io/reboot-pending";
pub const REBOOT_PENDING_EFFECT: &str = "PreferNoSchedule";

fn ours(t: &Taint) -> bool {
    t.key == REBOOT_PENDING_TAINT
}

/// The taints with ours present (`want`) or gone, the others as they are, in their order;
/// `None` when nothing is to change.
pub fn taints_with(current: &[Taint], want: bool) -> Option<Vec<Taint>> {
    let present = current
        .iter()
        .any(|t| ours(t) && t.effect == REBOOT_PENDING_EFFECT);
    let stray = current
        .iter()
        .any(|t| ours(t) && t.effect != REBOOT_PENDING_EFFECT);
    if present == want && !stray {
        return None;
    }
    let mut next: Vec<Taint> = current.iter().filter(|t| !ours(t)).cloned().collect();
    if want {
        next.push(Taint {
            key: REBOOT_PENDING_TAINT.into(),
            effect: REBOOT_PENDING_EFFECT.into(),
            value: None,
            time_added: None,
        });
    }
    Some(next)
}

/// Puts our taint on `name` or takes it off; whether anything changed.
pub async fn set_reboot_pending(
    api: &Api<Node>,
    name: &str,
    want: bool,
) -> Result<bool, kube::Error> {
    cordon::update(api, name, |node| {
        let current = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        match taints_with(&current, want) {
            None => Change::Done(false),
            Some(next) => Change::Patch(json!({ "spec": { "taints": next } }), true),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            value: None,
            time_added: None,
        }
    }

    #[test]
    fn ours_is_added_after_the_others_and_removed_without_touching_them() {
        let theirs = vec![
            taint("dedicated", "NoSchedule"),
            taint("gpu", "PreferNoSchedule"),
        ];
        let added = taints_with(&theirs, true).expect("a change");
        assert_eq!(&added[..2], &theirs[..]);
        assert_eq!(added[2], taint(REBOOT_PENDING_TAINT, "PreferNoSchedule"));
        assert_eq!(taints_with(&added, true), None, "already there");
        assert_eq!(taints_with(&added, false), Some(theirs.clone()));
        assert_eq!(taints_with(&theirs, false), None, "nothing to remove");
    }

    #[test]
    fn our_key_with_another_effect_is_put_right() {
        let wrong = vec![taint(REBOOT_PENDING_TAINT, "NoSchedule")];
        assert_eq!(
            taints_with(&wrong, true),
            Some(vec![taint(REBOOT_PENDING_TAINT, "PreferNoSchedule")])
        );
        assert_eq!(taints_with(&wrong, false), Some(vec![]));
    }
}
