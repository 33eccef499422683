//! `cdp-qemu`: the QEMU launch wrapper. See the cdp-hooks library.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let e = cdp_hooks::launch::run(&args);
    // On stderr, where libvirt's log (and `virsh start`) shows it.
    eprintln!("cdp-qemu: error: {e:#}");
    std::process::exit(1);
}
