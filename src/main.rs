//! promptmill's entry point: parse the command line, run, exit with the run's code.

use clap::Parser;

fn main() {
    let cli = promptmill::cli::Cli::parse();
    std::process::exit(promptmill::app::main(cli));
}
