//! Command-line front end: one file per subcommand, each turning flags into library calls.

pub mod bench;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod train;

use std::fmt;

/// An error caused by the user's input (bad recipe, missing file, unknown model…): exit code 2.
#[derive(Debug)]
pub struct UserError(pub anyhow::Error);

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for UserError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Marks an error as the user's.
pub fn user<E: Into<anyhow::Error>>(e: E) -> anyhow::Error {
    anyhow::Error::new(UserError(e.into()))
}

/// Hub options from the environment, with progress bars when stderr is a terminal.
pub fn hub_options() -> peftkit::hub::HubOptions {
    let mut o = peftkit::hub::HubOptions::from_env();
    o.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    o
}
