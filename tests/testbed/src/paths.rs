//! Where the bed finds what it built once and caches: binaries, root filesystems, elogind.

use std::path::PathBuf;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root exists")
}

/// Cache folder for everything the bed builds: `TESTBED_CACHE`, else `<workspace>/target/testbed`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("TESTBED_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("target/testbed"),
    }
}

/// Scripts shipped with the bed (`tests/testbed/scripts`).
pub fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// Folder holding etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubectl.
/// Honours the envtest convention: `KUBEBUILDER_ASSETS` wins when it holds a kube-apiserver.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from)
        && dir.join("kube-apiserver").is_file()
    {
        return dir;
    }
    cache_dir().join("bin")
}
