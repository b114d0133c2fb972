//! The test bed: a real control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler), simulated kubelets and KubeVirt, and a real logind, on one machine.
//!
//! Every piece is torn down by PID when its handle drops, so a panicking test leaves
//! nothing behind.

pub mod apiproxy;
pub mod bed;
pub mod bench;
pub mod controlplane;
pub mod ctl;
pub mod demo;
pub mod kubelet;
pub mod kubevirt;
pub mod ledger;
pub mod logind;
pub mod paths;
pub mod pki;
pub mod pod;
pub mod process;
pub mod timeline;
pub mod wait;
