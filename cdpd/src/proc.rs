//! Small process helpers.

/// Has process `pid` exited? A zombie counts as exited: its parent may never
/// reap it (a child of QEMU after QEMU died, under an init that does not reap).
pub fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S …": the state follows the last ')'.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn self_is_alive_and_a_reaped_child_is_gone() {
        assert!(!super::is_gone(std::process::id() as i32));
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id() as i32;
        // Exited but not reaped yet: a zombie, gone for our purposes.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(super::is_gone(pid));
        c.wait().unwrap();
        assert!(super::is_gone(pid));
    }
}
