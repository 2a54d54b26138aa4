//! Rebuilds the programs when the `bpf-linker` binary changes (cargo cannot
//! see that dependency otherwise).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(error) => println!("cargo:warning=bpf-linker not found ({error}); run ./x setup"),
    }
}
