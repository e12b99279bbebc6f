//! Compiles the XDP program (bpf/palisade.bpf.c) with clang into OUT_DIR.
//! Without clang and libbpf-dev the crate still builds, without XDP (the
//! daemon then says so and uses the capture socket), so that a fresh
//! machine with only Rust can run Palisade.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(palisade_xdp)");
    println!("cargo::rerun-if-changed=bpf/palisade.bpf.c");
    println!("cargo::rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("palisade.bpf.o");
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let built = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-target", "bpf"])
        .arg(format!("-I/usr/include/{arch}"))
        .args(["-c", "bpf/palisade.bpf.c", "-o"])
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    if built {
        println!("cargo::rustc-cfg=palisade_xdp");
    } else {
        let _ = std::fs::write(&out, []);
        println!("cargo::warning=clang with libbpf-dev not found: Palisade builds without its XDP program");
    }
}
