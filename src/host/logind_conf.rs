//! logind's `InhibitDelayMaxSec`: which configuration file sets it, and writing our drop-in.
//!
//! logind reads its main file, then every `*.conf` drop-in of its `logind.conf.d` directories
//! sorted by file name, a name in `/etc` hiding the same name in `/run`, which hides the same
//! name under `/usr` (systemd's `conf_files_list`); the last assignment wins. Knowing the file
//! matters because another package's drop-in sorting after ours silently wins
//! (kubernetes#102818: unattended-upgrades ships one with 30 s).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Main files, in the order read (elogind's last).
const MAIN_FILES: &[&str] = &[
    "usr/lib/systemd/logind.conf",
    "etc/systemd/logind.conf",
    "etc/elogind/logind.conf",
];

/// Drop-in directories, highest priority first.
const DROPIN_DIRS: &[&str] = &[
    "etc/systemd/logind.conf.d",
    "run/systemd/logind.conf.d",
    "usr/local/lib/systemd/logind.conf.d",
    "usr/lib/systemd/logind.conf.d",
    "etc/elogind/logind.conf.d",
];

pub const KEY: &str = "InhibitDelayMaxSec";

#[derive(Debug, thiserror::Error)]
pub enum DropinError {
    #[error("writing logind drop-in {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The files logind reads, in order, under `host_root`.
pub fn files_in_order(host_root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = MAIN_FILES
        .iter()
        .map(|f| host_root.join(f))
        .filter(|p| p.is_file())
        .collect();
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in DROPIN_DIRS {
        let Ok(entries) = std::fs::read_dir(host_root.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".conf") {
                by_name.entry(name).or_insert_with(|| e.path());
            }
        }
    }
    out.extend(by_name.into_values());
    out
}

/// The value of `InhibitDelayMaxSec` in the `[Login]` section of one file's text, if set.
pub fn setting_in(text: &str) -> Option<String> {
    let mut in_login = false;
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            in_login = line == "[Login]";
            continue;
        }
        if in_login
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == KEY
        {
            found = Some(v.trim().to_string());
        }
    }
    found
}

/// The file whose `InhibitDelayMaxSec` logind ends up using, with the value written there.
pub fn effective_setting(files: &[(PathBuf, String)]) -> Option<(PathBuf, String)> {
    files
        .iter()
        .filter_map(|(p, text)| setting_in(text).map(|v| (p.clone(), v)))
        .next_back()
}

pub fn find_effective_setting(host_root: &Path) -> Option<(PathBuf, String)> {
    let files: Vec<(PathBuf, String)> = files_in_order(host_root)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(&p).ok().map(|t| (p, t)))
        .collect();
    effective_setting(&files)
}

pub fn dropin_text(delay: Duration) -> String {
    format!(
        "# Written by shutdown-guard: logind waits this long for the node's VMs to move away.\n\
         [Login]\n{KEY}={}s\n",
        delay.as_secs().max(1)
    )
}

/// Writes the drop-in (under `host_root`) atomically; returns whether the content changed.
pub fn write_dropin(host_root: &Path, dropin: &Path, delay: Duration) -> Result<bool, DropinError> {
    let path = host_root.join(dropin.strip_prefix("/").unwrap_or(dropin));
    let text = dropin_text(delay);
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(false);
    }
    let err = |source| DropinError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("conf.tmp");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_assignment_in_login_section_wins() {
        assert_eq!(
            setting_in(
                "[Login]\nInhibitDelayMaxSec=5\n#InhibitDelayMaxSec=9\nInhibitDelayMaxSec = 30s\n[Other]\nInhibitDelayMaxSec=1\n"
            ),
            Some("30s".into())
        );
        assert_eq!(setting_in("[Login]\nKillUserProcesses=no\n"), None);
    }

    #[test]
    fn later_dropin_overrides_and_etc_hides_run() {
        let root = tempfile::tempdir().unwrap();
        let w = |rel: &str, text: &str| {
            let p = root.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        w("etc/systemd/logind.conf", "[Login]\nInhibitDelayMaxSec=5\n");
        w(
            "etc/systemd/logind.conf.d/10-ours.conf",
            "[Login]\nInhibitDelayMaxSec=300\n",
        );
        w(
            "usr/lib/systemd/logind.conf.d/50-unattended-upgrades.conf",
            "[Login]\nInhibitDelayMaxSec=30\n",
        );
        // Hidden by the /etc file of the same name.
        w(
            "run/systemd/logind.conf.d/10-ours.conf",
            "[Login]\nInhibitDelayMaxSec=1\n",
        );
        let (p, v) = find_effective_setting(root.path()).unwrap();
        assert!(p.ends_with("usr/lib/systemd/logind.conf.d/50-unattended-upgrades.conf"));
        assert_eq!(v, "30");

        assert!(
            write_dropin(
                root.path(),
                Path::new("/etc/systemd/logind.conf.d/99-shutdown-guard.conf"),
                Duration::from_secs(305)
            )
            .unwrap()
        );
        let (p, v) = find_effective_setting(root.path()).unwrap();
        assert!(p.ends_with("99-shutdown-guard.conf"));
        assert_eq!(v, "305s");
        // Unchanged content is not rewritten.
        assert!(
            !write_dropin(
                root.path(),
                Path::new("/etc/systemd/logind.conf.d/99-shutdown-guard.conf"),
                Duration::from_secs(305)
            )
            .unwrap()
        );
    }
}
