//! `peftkit push DIR --repo owner/name [--private] [--revision main] [--message TEXT]`

use super::{hub_options, user};
use anyhow::Result;
use peftkit::push::{self, PushOptions, PushReport};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The folder to publish: an adapter from `peftkit train` or a model from `peftkit merge` (with its README.md).
    pub dir: PathBuf,
    /// The Hub repo, `owner/name` (or `name` for one under the token's own account); created if missing.
    #[arg(long)]
    pub repo: String,
    /// Create the repo as private (a repo that exists keeps its visibility).
    #[arg(long)]
    pub private: bool,
    /// The branch to commit to; created from main if it does not exist.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// The commit message (default: "Upload adapter trained with peftkit" or "Upload model merged with peftkit").
    #[arg(long)]
    pub message: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let hub = hub_options();
    let opts = PushOptions {
        folder: a.dir,
        repo: a.repo,
        private: a.private,
        revision: a.revision,
        message: a.message,
        progress: hub.progress,
        hub,
    };
    let report = run_push(&opts)?;
    print_report(&report);
    Ok(())
}

/// Pushes, marking input problems (folder, flags, token) as user errors (exit code 2).
pub fn run_push(opts: &PushOptions) -> Result<PushReport> {
    tracing::info!("pushing {} to {} ({})", opts.folder.display(), opts.repo, opts.revision);
    push::push(opts).map_err(|e| if e.is_user_error() { user(e) } else { anyhow::Error::new(e) })
}

pub fn print_report(r: &PushReport) {
    let sent: u64 = r.files.iter().filter(|f| f.uploaded).map(|f| f.size).sum();
    let lfs = r.files.iter().filter(|f| f.lfs).count();
    println!(
        "pushed {} files ({} as large files{}; {} sent) to {}{}",
        r.files.len(),
        lfs,
        r.transfer.as_deref().map(|t| format!(", {t} transfer")).unwrap_or_default(),
        human_bytes(sent),
        r.repo,
        if r.created { " (new repo)" } else { "" }
    );
    for (path, why) in &r.skipped {
        println!("  not pushed: {path} ({why})");
    }
    if let Some(c) = &r.commit_url {
        println!("commit: {c}");
    }
    println!("{}", r.url);
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
