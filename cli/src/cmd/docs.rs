//! `completions` and `man`: generated from the clap definitions, so they
//! cannot drift from the command line.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use super::Cli;
use crate::Failure;

pub fn completions(shell: clap_complete::Shell) -> Result<(), Failure> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "meshnode", &mut std::io::stdout());
    Ok(())
}

pub fn man(out: &Path) -> Result<(), Failure> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating {}", out.display()))
        .map_err(Failure::runtime)?;
    clap_mangen::generate_to(Cli::command(), out)
        .with_context(|| format!("writing man pages into {}", out.display()))
        .map_err(Failure::runtime)?;
    let pages = std::fs::read_dir(out)
        .map(|d| d.filter_map(Result::ok).count())
        .unwrap_or(0);
    eprintln!("wrote {pages} man page(s) into {}", out.display());
    Ok(())
}
