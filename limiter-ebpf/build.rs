//! Rebuilds the programs when the `bpf-linker` binary changes (cargo cannot
//! see that dependency otherwise), and has the linker keep the classifying
//! and charging functions global: the verifier checks a global function
//! once, on its own (see `limiter_classify` in src/classify.rs and
//! `limiter_charge` in src/enforce.rs).
fn main() {
    println!("cargo:rustc-link-arg-bin=limiter=--export=limiter_charge");
    println!("cargo:rustc-link-arg-bin=limiter=--export=limiter_classify");
    println!("cargo:rustc-link-arg-bin=limiter=--export=limiter_reply_allowed");
    println!("cargo:rustc-link-arg-bin=limiter=--export=limiter_fleet_source");
    println!("cargo:rustc-link-arg-bin=limiter=--export=limiter_fleet_source_admitted");
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(error) => println!("cargo:warning=bpf-linker not found ({error}); run ./x setup"),
    }
}
