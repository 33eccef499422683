//! Validation of names before they become path components or socket names.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("disk name {0:?} is not valid: use 1-64 characters from a-z, A-Z, 0-9, '_' and '-' (a disk target such as vda)")]
    Disk(String),
    #[error("VM UUID {0:?} is not a UUID (expected the form 8-4-4-4-12 hex digits)")]
    Uuid(String),
    #[error("VM name {0:?} is not valid: use 1-255 printable characters without '/'")]
    VmName(String),
    #[error("mark label {0:?} is not valid: use 1-128 printable characters")]
    Label(String),
}

pub fn check_disk(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Disk(name.to_string()))
    }
}

/// Parse a VM UUID and return it in canonical (lowercase, hyphenated) form.
pub fn check_uuid(s: &str) -> Result<uuid::Uuid, NameError> {
    let u = uuid::Uuid::try_parse(s).map_err(|_| NameError::Uuid(s.to_string()))?;
    if u.hyphenated().to_string() != s.to_ascii_lowercase() {
        return Err(NameError::Uuid(s.to_string()));
    }
    Ok(u)
}

pub fn check_vm_name(s: &str) -> Result<(), NameError> {
    let ok =
        !s.is_empty() && s.len() <= 255 && !s.contains('/') && !s.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(NameError::VmName(s.to_string()))
    }
}

pub fn check_label(s: &str) -> Result<(), NameError> {
    let ok = !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(NameError::Label(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        for ok in ["vda", "sdb", "disk_1", "hd-a"] {
            check_disk(ok).unwrap();
        }
        for bad in ["", "..", "a/b", "-x", "vda.sock", &"x".repeat(65), "a b"] {
            assert!(check_disk(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uuids() {
        check_uuid("6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b").unwrap();
        assert!(check_uuid("6f1c2a8e3b4d4e5f8a9b0c1d2e3f4a5b").is_err());
        assert!(check_uuid("../../etc").is_err());
        // Upper case is the same UUID, returned in canonical form; other
        // spellings uuid accepts (braces, urn:) are not path-safe names.
        assert_eq!(
            check_uuid("6F1C2A8E-3B4D-4E5F-8A9B-0C1D2E3F4A5B")
                .unwrap()
                .to_string(),
            "6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
        );
        for bad in [
            "{6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b}",
            "urn:uuid:6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
            "",
        ] {
            assert_eq!(check_uuid(bad), Err(NameError::Uuid(bad.into())));
        }
    }

    #[test]
    fn labels() {
        check_label("before upgrade").unwrap();
        check_label(&"x".repeat(128)).unwrap();
        for bad in ["", "a\nb", "\u{7f}", &"x".repeat(129)] {
            assert_eq!(
                check_label(bad),
                Err(NameError::Label(bad.into())),
                "{bad:?}"
            );
        }
        assert!(check_vm_name(&"v".repeat(256)).is_err());
        assert!(check_vm_name("tab\there").is_err());
    }

    #[test]
    fn vm_names() {
        check_vm_name("web-01").unwrap();
        assert!(check_vm_name("a/b").is_err());
        assert!(check_vm_name("").is_err());
    }
}
