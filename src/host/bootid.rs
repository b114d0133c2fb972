//! The kernel's boot ID, which tells this boot from the one in which the agent cordoned the node
//! (the agent lifts only a cordon it set in an earlier boot).

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BootIdError {
    #[error("reading the boot ID from {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the boot ID in {path} is empty")]
    Empty { path: String },
}

pub fn read_boot_id(path: &Path) -> Result<String, BootIdError> {
    let raw = std::fs::read_to_string(path).map_err(|source| BootIdError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let id = raw.trim().to_string();
    if id.is_empty() {
        return Err(BootIdError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_id_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("boot_id");
        std::fs::write(&p, "0f1e2d3c-aaaa-bbbb-cccc-123456789abc\n").unwrap();
        assert_eq!(
            read_boot_id(&p).unwrap(),
            "0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
        );
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(read_boot_id(&p), Err(BootIdError::Empty { .. })));
        assert!(matches!(
            read_boot_id(&dir.path().join("missing")),
            Err(BootIdError::Read { .. })
        ));
    }
}
