//! `cdp-qemu`: the QEMU launch wrapper. See the cdp-hooks library.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The cdpd supervisor cdp-qemu starts for itself (never libvirt's argv).
    if args.first().map(String::as_str) == Some(cdp_hooks::supervise::FLAG) {
        std::process::exit(cdp_hooks::supervise::main(&args[1..]));
    }
    let e = cdp_hooks::launch::run(&args);
    // On stderr, where libvirt's log (and `virsh start`) shows it.
    eprintln!("cdp-qemu: error: {e:#}");
    std::process::exit(1);
}
