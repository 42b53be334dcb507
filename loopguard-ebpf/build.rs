use which::which;

/// Rebuild when bpf-linker changes: it is not a cargo dependency, but it
/// decides what the object file looks like.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
