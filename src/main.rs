use clap::Parser;

fn main() {
    let args = ferry::cli::Cli::parse();
    std::process::exit(ferry::cli::run(args));
}
