//! One module per subcommand.

pub mod apply;
pub mod audit;
pub mod check;
pub mod explain;
pub mod remove;
pub mod run;
pub mod status;

pub use loopguard::check::{check_source, read_policy, timed, Refusal};

/// `1 service`, `3 services`
pub fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// `3 errors, 1 warning`
pub fn counts(errors: usize, warnings: usize) -> String {
    format!(
        "{}, {}",
        plural(errors, "error"),
        plural(warnings, "warning")
    )
}
