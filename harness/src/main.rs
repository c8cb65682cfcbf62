//! `ablate`: declare an ablation grid in TOML, train the paired variants, evaluate, report.
fn main() {
    std::process::exit(harness::cli::main());
}
