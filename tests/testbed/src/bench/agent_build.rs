//! The agent binary every section of one run uses: built by the bench itself, in the release
//! profile the image ships (`[profile.release]` of the workspace's Cargo.toml), and named by
//! the git revision it was built from.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The binary a run measures and where it came from.
#[derive(Clone, Debug)]
pub struct AgentBuild {
    pub binary: PathBuf,
    /// `git rev-parse --short=12 HEAD`, with `-dirty` when tracked files differ from it.
    pub revision: String,
    /// The command that built it, or why none ran.
    pub built_by: String,
    /// `[profile.release]` as Cargo.toml has it, one `key = value` per entry.
    pub profile: Vec<String>,
    pub size: u64,
    pub took: Duration,
}

/// A path as the report shows it: relative to the workspace when under it.
pub fn rel(path: &Path) -> String {
    let root = crate::paths::workspace_root();
    match path.strip_prefix(&root) {
        Ok(p) => p.display().to_string(),
        Err(_) => match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
            Some(t) if path.starts_with(&t) => format!(
                "$CARGO_TARGET_DIR/{}",
                path.strip_prefix(&t).unwrap_or(path).display()
            ),
            _ => path.display().to_string(),
        },
    }
}

pub fn revision() -> String {
    let root = crate::paths::workspace_root();
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}

/// The `[profile.release]` entries of the workspace's Cargo.toml.
pub fn release_profile() -> Vec<String> {
    let text = std::fs::read_to_string(crate::paths::workspace_root().join("Cargo.toml"))
        .unwrap_or_default();
    text.lines()
        .skip_while(|l| l.trim() != "[profile.release]")
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Builds `shutdown-guard` in the release profile into a target folder of the bench's own
/// (`<target>/bench-agent`, so the build never waits on the lock of the `cargo run` that
/// started the bench), or takes `given` as it is.
pub fn build(given: Option<&Path>) -> Result<AgentBuild> {
    let revision = revision();
    let profile = release_profile();
    if let Some(path) = given {
        let size = std::fs::metadata(path)
            .with_context(|| format!("{} is missing", path.display()))?
            .len();
        return Ok(AgentBuild {
            binary: path.to_path_buf(),
            revision,
            built_by: format!(
                "not built by this run: `--agent {}` (a development run; its build profile is unknown)",
                rel(path)
            ),
            profile,
            size,
            took: Duration::ZERO,
        });
    }
    let root = crate::paths::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("bench-agent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let args = [
        "build",
        "--release",
        "--locked",
        "-p",
        "shutdown-guard",
        "--bin",
        "shutdown-guard",
    ];
    eprintln!(
        "bench: building the agent: cargo {} --target-dir {}",
        args.join(" "),
        target.display()
    );
    let began = Instant::now();
    let status = std::process::Command::new(&cargo)
        .current_dir(&root)
        .args(args)
        .arg("--target-dir")
        .arg(&target)
        // The profile is the workspace's; nothing from the caller's environment may change it.
        .env_remove("CARGO_PROFILE_RELEASE_LTO")
        .env_remove("CARGO_PROFILE_RELEASE_OPT_LEVEL")
        .env_remove("CARGO_PROFILE_RELEASE_DEBUG")
        .env_remove("RUSTFLAGS")
        .stdin(Stdio::null())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("building the agent failed ({status})");
    }
    let binary = target.join("release/shutdown-guard");
    let size = std::fs::metadata(&binary)
        .with_context(|| format!("{} is missing after the build", binary.display()))?
        .len();
    Ok(AgentBuild {
        built_by: format!("`cargo {} --target-dir {}`", args.join(" "), rel(&target)),
        binary,
        revision,
        profile,
        size,
        took: began.elapsed(),
    })
}

/// Whether an ELF file asks for a program interpreter (is dynamically linked).
pub fn is_dynamic(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return true;
    };
    // 64-bit little-endian ELF: program headers at e_phoff (0x20), e_phentsize (0x36),
    // e_phnum (0x38); PT_INTERP is type 3.
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return true;
    }
    let u16le = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap_or_default()) as usize;
    let (size, count) = (u16le(0x36), u16le(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        bytes
            .get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap_or_default()) == 3)
    })
}

/// The image the Dockerfile builds is `FROM scratch` plus one layer holding the binary at
/// `usr/local/bin/shutdown-guard`; without a container builder its size is that layer's.
/// `(tar bytes, tar.gz bytes)` of `binary` laid out so.
pub fn image_layer(binary: &Path) -> Option<(u64, u64)> {
    let dir = tempfile::tempdir().ok()?;
    let dest = dir.path().join("usr/local/bin");
    std::fs::create_dir_all(&dest).ok()?;
    std::fs::copy(binary, dest.join("shutdown-guard")).ok()?;
    let tar = std::process::Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(dir.path())
        .args(["-cf", "-", "usr"])
        .output()
        .ok()?;
    if !tar.status.success() {
        return None;
    }
    let mut gzip = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdin = gzip.stdin.take()?;
    let data = tar.stdout.clone();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = gzip.wait_with_output().ok()?;
    writer.join().ok()?.ok()?;
    Some((tar.stdout.len() as u64, out.stdout.len() as u64))
}

/// The agent where any user may run it, as the image has it in `/usr/local/bin`: the holder
/// starts the worker from its own file as an unprivileged user, who cannot reach a binary
/// under a private home folder. Removed when dropped.
pub struct Installed {
    dir: tempfile::TempDir,
}

impl Installed {
    pub fn new(binary: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("shutdown-guard-bench-")
            .tempdir()
            .context("creating the agent's folder")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let to = dir.path().join("shutdown-guard");
        std::fs::copy(binary, &to)
            .with_context(|| format!("copying {} to {}", binary.display(), to.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("shutdown-guard")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_release_profile_is_read_from_cargo_toml() {
        let p = release_profile();
        assert!(p.iter().any(|l| l.starts_with("lto")), "{p:?}");
    }

    #[test]
    fn a_dynamically_linked_binary_is_told_apart() {
        assert!(is_dynamic(Path::new("/bin/sh")));
        assert!(is_dynamic(Path::new("/nonexistent")));
    }
}
